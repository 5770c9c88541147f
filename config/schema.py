"""The settings: one frozen dataclass per section, one declarative field per setting (G5, F1).

Every field carries its default, its help text and its unit in ``dataclasses.field(metadata=...)``
(built by :func:`setting`); the YAML loader, ``dump()``, ``config/default.yaml`` comments and the
README table (``reference_table()``) are all generated from these records. Add a setting here and
everything else follows.

Validation works on plain Python values (from YAML nodes or from CLI overrides alike) and raises
:class:`ConfigError` carrying the key path; the loader adds the YAML line.

Sinks: each sink type declares its own options (``options_class`` on the sink class, in the
sinks package); this package knows only the shape of an entry (``type``, ``name``, options) and
validates the options through a :class:`SinkTypes` catalog passed down to it (:func:`check_sinks`),
so it imports nothing above itself.
"""

from __future__ import annotations

import builtins
import dataclasses
import grp
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from difflib import get_close_matches
from typing import Any, Literal, Protocol, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

from streamtap.errors import Error

from .units import _show, parse_duration, parse_size

Unit = Literal["duration", "size"] | None
Check = Callable[[Any, str], Any]

MIB = 1024**2
GIB = 1024**3
MAX_SNAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN; tcpdump's -s 0 means this


class ConfigError(Error):
    """A configuration problem: ``source:line: key.path: message``.

    ``key_path`` is dotted (``reassembly.timeouts.handshake``, ``sinks[0].type``), None for file or
    YAML syntax problems; ``line`` is 1-based, None for CLI overrides; ``source`` the file name
    (``<string>`` for :func:`loads`), None for overrides. ``message`` is the bare message.
    """

    def __init__(
        self,
        message: str,
        key_path: str | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key_path = key_path
        self.line = line
        self.source = source

    def __str__(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source if self.line is None else f"{self.source}:{self.line}")
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.key_path:
            parts.append(self.key_path)
        parts.append(self.message)
        return ": ".join(parts)

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling across worker pipes
        return (type(self), (self.message, self.key_path, self.line, self.source))


def setting(
    default: Any = MISSING,
    *,
    help: str,
    unit: Unit = None,
    factory: Callable[[], Any] | None = None,
    positive: bool = False,
    max: int | float | None = None,
    check: Check | None = None,
    secret: bool = False,
) -> Any:
    """One setting: default, help, unit (``"duration"`` | ``"size"`` | None) and constraints.

    Every number is non-negative; ``positive`` also refuses 0; ``max`` is inclusive. ``check`` is
    called as ``check(value, key_path)`` after conversion and returns the (possibly normalized)
    value or raises :class:`ConfigError`. A ``secret`` value is masked by ``dump()`` (see
    :func:`mask_secret`).
    """
    metadata = {"help": help, "unit": unit, "positive": positive, "max": max, "check": check,
                "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- checks


def _snaplen(value: int, path: str) -> int:
    return MAX_SNAPLEN if value == 0 else value


def _listen(value: str | None, path: str) -> str | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"expected 127.0.0.1:PORT, got {value!r}", path)
    if host != "127.0.0.1":
        raise ConfigError(
            f"only 127.0.0.1:PORT is allowed (the control API has no authentication), "
            f"got host {host!r}",
            path,
        )
    return value


def _group(value: str | None, path: str) -> str | None:
    if value is None:
        return None
    try:
        grp.getgrnam(value)
    except KeyError:
        raise ConfigError(f"no such group {value!r}", path) from None
    return value


def _absolute_dirs(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not os.path.isabs(item):
            raise ConfigError(f"expected an absolute path, got {item!r}", f"{path}[{i}]")
    return tuple(os.path.normpath(item) for item in value)


def redact_url(url: str) -> str:
    """`url` without its userinfo (`http://u:p@h:1/` -> `http://***@h:1/`)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def mask_secret(value: Any) -> Any:
    """A secret setting as ``dump()`` shows it: a URL loses its userinfo, anything else set
    becomes ``***``; null stays null (it says where the value comes from instead)."""
    if value is None:
        return None
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return "***"


def _unique_sink_names(value: tuple[SinkConfig, ...], path: str) -> tuple[SinkConfig, ...]:
    seen: dict[str, int] = {}
    for i, sink in enumerate(value):
        if sink.name is None:
            continue
        if sink.name in seen:
            raise ConfigError(
                f"duplicate sink name {sink.name!r} (also sinks[{seen[sink.name]}])",
                f"{path}[{i}].name",
            )
        seen[sink.name] = i
    return value


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class CaptureConfig:
    """Where packets come from (live capture; `-r FILE` ignores interface and buffer settings)."""

    interface: str | None = setting(
        None, help="Network interface to capture on (tcpdump -i); null = none, give -i or -r."
    )
    snaplen: int = setting(
        MAX_SNAPLEN,
        max=MAX_SNAPLEN,
        check=_snaplen,
        help="Bytes captured per packet (tcpdump -s); 0 = 262144, the maximum. Payload cut by "
        "the snaplen is recorded as a gap and flags the stream truncated.",
    )
    buffer_size: int = setting(
        64 * MIB,
        unit="size",
        help="Kernel capture buffer per worker handle (tcpdump -B, which takes KiB); "
        "0 = libpcap's default.",
    )
    promiscuous: bool = setting(
        True, help="Put the interface in promiscuous mode (tcpdump -p turns it off)."
    )
    filter: str = setting(
        "",
        help='BPF filter expression, as tcpdump takes it; "" = every packet (non-TCP packets '
        "are dropped by the decoder anyway).",
    )
    workers: int = setting(
        0,
        help="Worker processes (capture shards); 0 = one per CPU core. 1 runs the worker loop "
        "inside the supervisor. Applies to -r of one file too (BPF shard filters; stdin, "
        "several files and -c read with one).",
    )
    fanout_group: int | None = setting(
        None,
        max=65535,
        help="PACKET_FANOUT group id shared by the workers' handles; null = derived from the "
        "interface name. Set it only if two daemons collide.",
    )
    shutdown_timeout: float = setting(
        10.0,
        unit="duration",
        help="On SIGTERM, how long workers get to flush open streams (close_reason shutdown) "
        "before they are killed.",
    )


@dataclass(frozen=True)
class TimeoutsConfig:
    """Idle timeouts per connection state, on packet time (live: max(packet, wall clock))."""

    handshake: float = setting(
        30.0, unit="duration", positive=True, help="Idle timeout before the handshake completes."
    )
    established: float = setting(
        600.0, unit="duration", positive=True, help="Idle timeout of an established connection."
    )
    closing: float = setting(
        60.0,
        unit="duration",
        positive=True,
        help="Idle timeout once one side has sent a FIN.",
    )
    rst_linger: float = setting(
        5.0,
        unit="duration",
        help="After a RST, how long stragglers are still added before the stream ends; 0 = end "
        "at once.",
    )
    fin_linger: float = setting(
        5.0,
        unit="duration",
        help="After FINs both ways, how long to wait for the final ACK and stragglers; 0 = end "
        "at once.",
    )


@dataclass(frozen=True)
class LimitsConfig:
    """Resource limits; each hit is counted and flagged, never a silent drop."""

    max_flows: int = setting(
        1_000_000,
        positive=True,
        help="Open connections per worker shard; past it the oldest idle one is evicted "
        "(close_reason evicted).",
    )
    depth: int = setting(
        0,
        unit="size",
        help="Reassembly depth per direction: bytes kept per stream side; data past it is "
        "counted and the stream flagged truncated. 0 = unlimited.",
    )
    ooo_bytes: int = setting(
        1 * MIB,
        unit="size",
        help="Out-of-order bytes held per direction while waiting for a hole to fill; past it "
        "the hole is skipped as a gap. 0 = unlimited.",
    )
    memory: int = setting(
        1 * GIB,
        unit="size",
        help="Memory cap of reassembly, all workers together (each of N workers enforces "
        "1/N of it): stream buffers plus every open flow at its measured size (about 400 B "
        "for a flow seen as one SYN, 1.5 KiB for any other). Checked before memory is taken; "
        "over it, half-open flows are evicted first, then the longest idle, and idle "
        "timeouts are 10 times shorter until usage falls under 70 % (emergency mode). Each "
        "eviction is counted by reason. 0 = unlimited.",
    )


@dataclass(frozen=True)
class FragmentsConfig:
    """IP fragment reassembly (IPv4 and IPv6)."""

    max_pending: int = setting(
        8192,
        positive=True,
        help="Datagrams being reassembled at once per worker; past it the oldest is dropped "
        "(counted).",
    )
    timeout: float = setting(
        30.0,
        unit="duration",
        positive=True,
        help="How long an incomplete datagram waits for its missing fragments.",
    )


@dataclass(frozen=True)
class ReassemblyConfig:
    """How TCP segments become the two byte streams of a connection."""

    overlap: Literal["first", "last"] = setting(
        "first",
        help="Overlapping segments: first = the bytes captured first for an offset stay; "
        "last = the newest bytes win (tcpflow).",
    )
    emit_empty: bool = setting(
        True,
        help="Emit streams without payload (refused connections, scans), like a flow log.",
    )
    keep_packets: bool = setting(
        False,
        help="Keep each stream's raw packets for the pcap sink (costs memory).",
    )
    part_bytes: int = setting(
        64 * MIB,
        unit="size",
        help="A connection is emitted in parts: once one direction holds this many bytes, "
        "what both hold is emitted as a part (same stream.id, next stream.part, close_reason "
        "part) and reassembly goes on. 0 = never by size.",
    )
    part_interval: float = setting(
        600.0,
        unit="duration",
        help="Also emit a part when this long has passed since the connection started or "
        "its last part, if it holds any bytes. 0 = never by time.",
    )
    timeouts: TimeoutsConfig = setting(factory=TimeoutsConfig, help=TimeoutsConfig.__doc__ or "")
    limits: LimitsConfig = setting(factory=LimitsConfig, help=LimitsConfig.__doc__ or "")
    fragments: FragmentsConfig = setting(
        factory=FragmentsConfig, help=FragmentsConfig.__doc__ or ""
    )


@dataclass(frozen=True)
class SinkConfig:
    """One sink entry: ``type``, optional ``name``, and the type's options (defaults filled in)."""

    type: str = setting(help="Sink type: jsonl, pcap, couchdb, files, or an installed plugin's.")
    name: str | None = setting(
        None, help="Name in logs and metrics; null = the type name (numbered if repeated)."
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        hash=False,
        metadata={"help": "The type-specific keys, validated, with their defaults filled in."},
    )
    # the sink type's options dataclass once validated (dump() reads units and secrets from
    # it); not a setting
    options_class: builtins.type | None = field(default=None, compare=False, repr=False,
                                       metadata={"internal": True})


@dataclass(frozen=True)
class ControlConfig:
    """The control API (GET /status, GET /metrics, POST /pcaps)."""

    socket: str | None = setting(
        None,
        help="Unix socket path; null = <runtime>/<interface>.sock, runtime = "
        "$RUNTIME_DIRECTORY else /run/streamtap.",
    )
    listen: str | None = setting(
        None,
        check=_listen,
        help="Also serve on TCP, as 127.0.0.1:PORT (loopback only: the API has no "
        "authentication); null = unix socket only.",
    )
    ingest_dirs: tuple[str, ...] = setting(
        (),
        check=_absolute_dirs,
        help="Absolute directories POST /pcaps may read files from; [] = ingestion disabled.",
    )
    group: str | None = setting(
        None,
        check=_group,
        help="Group of the unix socket (mode 0660: its members may use the API); null = the "
        "daemon's own group (streamtap under the packaged unit).",
    )
    max_connections: int = setting(
        64,
        positive=True,
        max=4096,
        help="Control connections served at once; one more is answered 503 and closed at once.",
    )
    request_timeout: float = setting(
        10.0,
        unit="duration",
        positive=True,
        help="Time a client has to send a whole request (line, headers, body), and an idle "
        "keep-alive connection waits for the next one; a slower client is cut (408).",
    )
    max_body: int = setting(
        64 * 1024,
        unit="size",
        positive=True,
        max=16 * MIB,
        help="Largest request body; a longer one is refused with 413 before it is read.",
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Daemon logs (journald under systemd, stderr otherwise)."""

    level: Literal["debug", "info", "warning", "error"] = setting(
        "info", help="Lowest level logged."
    )
    format: Literal["text", "json"] = setting("text", help="Log line format.")


# --------------------------------------------------------------------------- sink types


@dataclass(frozen=True)
class SinkType:
    """What the config needs to know of a sink type. The sinks layer declares it (each sink
    class its own ``options_class``) and hands a :class:`SinkTypes` catalog down to
    :func:`~streamtap.config.load`, so this package imports no sink code.

    ``options_class`` is a frozen dataclass of :func:`setting` fields (None: the keys are passed
    through as given); ``check(options_obj, key_path)`` states rules spanning several keys;
    ``needs_packets`` turns ``reassembly.keep_packets`` on (the pcap sink writes the packets);
    ``spec_key`` is the key ``--sink NAME:VALUE`` sets.
    """

    name: str
    options_class: type | None = None
    check: Callable[[Any, str], None] | None = None
    needs_packets: bool = False
    spec_key: str | None = None

    def validate(self, options: Mapping[str, Any], key_path: str) -> dict[str, Any]:
        """The options with defaults filled in; raises :class:`ConfigError`."""
        if self.options_class is None:
            result = dict(options)
            if self.check is not None:
                self.check(result, key_path)
            return result
        obj = check_options(self.options_class, options, f"for sink type {self.name}",
                            path=key_path, check=self.check, extra_known=("type", "name"))
        return dataclasses.asdict(obj)


def check_options(
    options_class: type,
    options: Mapping[str, Any] | None,
    where: str,
    *,
    path: str = "",
    check: Callable[[Any, str], None] | None = None,
    extra_known: tuple[str, ...] = (),
) -> Any:
    """An ``options_class`` instance from the mapping ``options``: the one check of a sink's
    options, for a config entry and a sink constructed directly alike. Unknown keys, types,
    enums, units and ranges are checked from the :func:`setting` fields, missing keys take
    their defaults, then ``check(obj, path)`` states the rules spanning several keys. ``where``
    names the owner in messages (``for sink type jsonl``); ``path`` is the key path of the
    mapping (``sinks[0]``; "" for a sink constructed directly). Raises :class:`ConfigError`."""
    obj = build(options_class, options, path, where=where, extra_known=extra_known)
    if check is not None:
        check(obj, path)
    return obj


class SinkTypes(Protocol):
    """A catalog of sink types (``streamtap.sinks.registry.sink_types()`` is the real one)."""

    def get(self, type_name: str) -> SinkType | None: ...

    def names(self) -> list[str]: ...


class SinkCatalog:
    """A fixed :class:`SinkTypes` catalog, in the order given (tests, embedders)."""

    def __init__(self, types: Iterable[SinkType]) -> None:
        self._types = {t.name: t for t in types}

    def get(self, type_name: str) -> SinkType | None:
        return self._types.get(type_name)

    def names(self) -> list[str]:
        return list(self._types)


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``default()`` is ``Config()``."""

    capture: CaptureConfig = setting(factory=CaptureConfig, help=CaptureConfig.__doc__ or "")
    reassembly: ReassemblyConfig = setting(
        factory=ReassemblyConfig, help=ReassemblyConfig.__doc__ or ""
    )
    sinks: tuple[SinkConfig, ...] = setting(
        (),
        check=_unique_sink_names,
        help="Where completed streams go: a list of mappings, each with type, an optional name "
        "and the type's keys. [] = JSON Lines on stdout, payloads base64.",
    )
    control: ControlConfig = setting(factory=ControlConfig, help=ControlConfig.__doc__ or "")
    logging: LoggingConfig = setting(factory=LoggingConfig, help=LoggingConfig.__doc__ or "")

    def effective_sinks(self) -> tuple[SinkConfig, ...]:
        """``sinks``, or the default when empty: one JSON Lines sink on stdout, base64 payloads."""
        if self.sinks:
            return self.sinks
        # the sink fills in its other defaults (streamtap.sinks.registry.build_sinks)
        return (SinkConfig(type="jsonl", options={"path": "-", "payload_encoding": "base64"}),)


# --------------------------------------------------------------------------- conversion


def build(
    cls: type,
    value: Any,
    path: str,
    *,
    where: str | None = None,
    extra_known: tuple[str, ...] = (),
) -> Any:
    """Instantiate dataclass ``cls`` from a mapping of plain values; missing keys take defaults."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {_show(value)}", path or None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key in value:
        if key in extra_known:
            continue
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {_show(key)}", join(path, str(key)))
        if key not in fields:
            known = [*extra_known, *fields]
            place = where or (f"in {path}" if path else "at the top level")
            hint = get_close_matches(key, known, n=1)
            guess = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"unknown key {key!r} {place}{guess}; known: {', '.join(known)}", join(path, key)
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = join(path, name)
        if name in value:
            kwargs[name] = convert_field(f, hints[name], value[name], sub)
        elif f.default is MISSING and f.default_factory is MISSING:
            place = f" {where}" if where else ""
            raise ConfigError(f"missing required key {name!r}{place}", path or None)
    return cls(**kwargs)


def convert_field(f: dataclasses.Field[Any], tp: Any, value: Any, path: str) -> Any:
    meta = f.metadata
    result = convert(tp, value, path, meta.get("unit"))
    if isinstance(result, int | float) and not isinstance(result, bool):
        if result < 0:
            raise ConfigError(f"must not be negative, got {_show(value)}", path)
        if meta.get("positive") and result == 0:
            raise ConfigError("must be greater than 0", path)
        limit = meta.get("max")
        if limit is not None and result > limit:
            raise ConfigError(f"must be at most {limit}, got {_show(value)}", path)
    check = meta.get("check")
    if check is not None:
        result = check(result, path)
    return result


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return get_args(tp)
    return None


def describe_type(tp: Any, unit: Unit = None) -> str:
    """Human name of a field type, for messages and docs."""
    if unit is not None:
        return unit
    args = _union_args(tp)
    if args is not None:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(describe_type(a) for a in inner) + " or null"
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list of {describe_type(get_args(tp)[0])}"
    return {bool: "bool", int: "integer", float: "number", str: "string"}.get(tp, "mapping")


def convert(tp: Any, value: Any, path: str, unit: Unit = None) -> Any:
    """Check and convert one plain value to field type ``tp`` (with ``unit``)."""
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported union {tp!r} at {path}")
        tp = inner[0]
    if unit == "duration":
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConfigError(str(exc), path) from None
    if unit == "size":
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(str(exc), path) from None
    if tp is SinkConfig:
        return _build_sink(value, path)
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, path)
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(
                f"expected one of {', '.join(map(str, choices))}, got {_show(value)}", path
            )
        return value
    if origin is tuple:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {_show(value)}", path)
        item_tp = get_args(tp)[0]
        return tuple(convert(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {_show(value)}", path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {_show(value)}", path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {_show(value)}", path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {_show(value)}", path)
        return value
    raise TypeError(f"unsupported setting type {tp!r} at {path}")


def _build_sink(value: Any, path: str) -> SinkConfig:
    """A sink entry's shape (a mapping with a string ``type``); its options are checked by
    :func:`check_sinks` against the sink type's own declaration."""
    if isinstance(value, SinkConfig):  # overrides may pass SinkConfig objects: re-validate them
        value = {**value.options, "type": value.type, "name": value.name}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping with a type key, got {_show(value)}", path)
    if "type" not in value:
        raise ConfigError("missing required key 'type'", path)
    type_name = value["type"]
    if not isinstance(type_name, str):
        raise ConfigError(f"expected a string, got {_show(type_name)}", f"{path}.type")
    name = value.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"expected a non-empty string, got {_show(name)}", f"{path}.name")
    options = {k: v for k, v in value.items() if k not in ("type", "name")}
    return SinkConfig(type=type_name, name=name, options=options)


def check_sink(sink: SinkConfig, path: str, sink_types: SinkTypes) -> SinkConfig:
    """``sink`` with its options validated by its type, defaults filled in."""
    sink_type = sink_types.get(sink.type)
    if sink_type is None:
        known = ", ".join(sink_types.names())
        raise ConfigError(f"unknown sink type {sink.type!r}; known types: {known}",
                          f"{path}.type")
    options = sink_type.validate(sink.options, path)
    return SinkConfig(sink.type, sink.name, options, options_class=sink_type.options_class)


def check_sinks(cfg: Config, sink_types: SinkTypes) -> Config:
    """``cfg`` with every sink checked by its type (:func:`check_sink`), and
    ``reassembly.keep_packets`` on when a sink type needs the packets (shown by
    ``--check-config`` as the value in force)."""
    sinks = tuple(check_sink(sc, f"sinks[{i}]", sink_types) for i, sc in enumerate(cfg.sinks))
    reassembly = cfg.reassembly
    if not reassembly.keep_packets and any(
        getattr(sink_types.get(sc.type), "needs_packets", False) for sc in sinks
    ):
        reassembly = dataclasses.replace(reassembly, keep_packets=True)
    return dataclasses.replace(cfg, sinks=sinks, reassembly=reassembly)
