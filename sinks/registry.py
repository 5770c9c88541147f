"""Which sink class serves a `type:`, and everything built from the config's sink entries.

Sink types: the built-ins, then plugins from the entry-point group "streamtap.sinks" (a
third-party package declares `mytype = "mypkg.module:MySink"`). A sink class subclasses
`streamtap.sinks.base.Sink` and declares its own settings: `options_class` (a frozen dataclass
of `streamtap.config.setting` fields: keys, types, units, defaults, help), and optionally
`options_check`, `spec_key` (the key `--sink TYPE:VALUE` sets) and `needs_packets`. A plugin
without `options_class` gets its keys passed through as given.

The config layer sees these declarations only as the `SinkTypes` catalog `sink_types()` returns,
passed down to `streamtap.config.load`; it imports nothing from here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from streamtap.config import Config, ConfigError, SinkConfig, SinkType, SinkTypes
from streamtap.config.schema import check_sink

from .base import Sink

__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "UnknownSinkType", "available", "build_sinks",
           "parse_sink_spec", "plugins", "sink_class", "sink_names", "sink_type", "sink_types"]

ENTRY_POINT_GROUP = "streamtap.sinks"
BUILTIN = {
    "jsonl": "streamtap.sinks.jsonl:JsonlSink",
    "pcap": "streamtap.sinks.pcap:PcapSink",
    "couchdb": "streamtap.sinks.couchdb:CouchdbSink",
    "files": "streamtap.sinks.files:FilesSink",
}


class UnknownSinkType(ConfigError):
    def __init__(self, type_name: str, available: list[str]) -> None:
        super().__init__(f"unknown sink type {type_name!r}; available: {', '.join(available)}")
        self.type_name = type_name
        self.available = available

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.available))


def plugins() -> dict[str, EntryPoint]:
    """Installed plugins by type name; a plugin cannot shadow a built-in."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def available() -> list[str]:
    return [*BUILTIN, *sorted(plugins())]


def sink_class(type_name: str) -> type[Sink]:
    if type_name in BUILTIN:
        module, _, attr = BUILTIN[type_name].partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    ep = plugins().get(type_name)
    if ep is None:
        raise UnknownSinkType(type_name, available())
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise UnknownSinkType(type_name, available())
    return cls


def sink_type(type_name: str) -> SinkType | None:
    """The config's view of a sink class's declarations; None for an unknown type."""
    try:
        cls = sink_class(type_name)
    except UnknownSinkType:
        return None
    options_class = getattr(cls, "options_class", None)
    if not (isinstance(options_class, type) and dataclasses.is_dataclass(options_class)):
        options_class = None
    return SinkType(
        name=type_name,
        options_class=options_class,
        check=getattr(cls, "options_check", None),
        needs_packets=bool(getattr(cls, "needs_packets", False)),
        spec_key=getattr(cls, "spec_key", None),
    )


class _Registry:
    """The installed sink types as a `streamtap.config.SinkTypes` catalog."""

    def get(self, type_name: str) -> SinkType | None:
        return sink_type(type_name)

    def names(self) -> list[str]:
        return available()


_REGISTRY = _Registry()


def sink_types() -> SinkTypes:
    """The catalog to pass to `streamtap.config.load(..., sink_types=...)`."""
    return _REGISTRY


def parse_sink_spec(spec: str) -> dict[str, Any]:
    """`--sink TYPE:VALUE` (jsonl:PATH|-, pcap:DIR, files:DIR, couchdb:URL, or a plugin's that
    declares `spec_key`) -> a sink entry for the config's overrides. The only parser of it."""
    type_name, sep, value = spec.partition(":")
    st = sink_type(type_name) if sep and value else None
    if st is None or st.spec_key is None:
        forms = []
        for name in available():
            key = getattr(sink_type(name), "spec_key", None)
            if key is not None:
                forms.append(f"{name}:{key.upper()}")
        raise ConfigError(f"--sink {spec!r}: expected one of {', '.join(forms)}", "sinks")
    return {"type": type_name, st.spec_key: value}


class _Named(Protocol):
    @property
    def type(self) -> str: ...

    @property
    def name(self) -> str | None: ...


def sink_names(sinks: Iterable[_Named]) -> list[str]:
    """The name of each sink, in order: its `name`, else its type; a repeated name gets `-2`,
    `-3`, ... (`jsonl`, `jsonl-2`). Logs, metrics labels and spool directories all use these,
    so two sinks of one type never share a spool or a metric. Takes config entries
    (`SinkConfig`) or sink objects alike."""
    names: list[str] = []
    taken: set[str] = set()
    for sink in sinks:
        base = sink.name or sink.type
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        names.append(name)
    return names


def create(sink_config: SinkConfig, *, name: str | None = None, interface: str | None = None,
           state_dir: str | None = None) -> Sink:
    """Instantiate the sink of a `streamtap.config.SinkConfig` (its options checked here if the
    config was loaded without a catalog)."""
    checked = check_sink(sink_config, "sinks[]", _REGISTRY)
    cls = sink_class(checked.type)
    try:
        return cls(name or checked.name or checked.type, dict(checked.options),
                   interface=interface, state_dir=state_dir)
    except ValueError as e:  # a plugin refusing its options in its constructor
        raise ConfigError(f"sink options: {e}", "sinks[]") from None


def build_sinks(cfg: Config, interface: str | None = None, *,
                state_dir: str | None = None) -> list[Sink]:
    """One sink object per configured sink (`cfg.effective_sinks()`: built-ins and entry-point
    plugins), named by `sink_names`. Raises `streamtap.config.ConfigError` for a bad entry."""
    configs = cfg.effective_sinks()
    return [
        create(sc, name=name, interface=interface, state_dir=state_dir)
        for sc, name in zip(configs, sink_names(configs), strict=True)
    ]
