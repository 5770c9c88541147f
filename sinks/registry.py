"""Which sink class serves a `type:`: the built-ins, then plugins from the entry-point group
"streamtap.sinks" (a third-party package declares `mytype = "mypkg.module:MySink"`).

A plugin class subclasses `streamtap.sinks.base.Sink`. If it has an `options` attribute that is
a dataclass, its config keys are validated like a built-in's (types, units, defaults);
otherwise its keys are passed through as given.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .base import Sink

ENTRY_POINT_GROUP = "streamtap.sinks"
BUILTIN = {
    "jsonl": "streamtap.sinks.jsonl:JsonlSink",
    "pcap": "streamtap.sinks.pcap:PcapSink",
    "couchdb": "streamtap.sinks.couchdb:CouchdbSink",
    "files": "streamtap.sinks.files:FilesSink",
}


class UnknownSinkType(ValueError):
    def __init__(self, type_name: str, available: list[str]) -> None:
        super().__init__(
            f"unknown sink type {type_name!r}; available: {', '.join(available)}"
        )
        self.type_name = type_name
        self.available = available


def plugins() -> dict[str, EntryPoint]:
    """Installed plugins by type name; a plugin cannot shadow a built-in."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def available() -> list[str]:
    return [*BUILTIN, *sorted(plugins())]


def sink_class(type_name: str) -> type[Sink]:
    if type_name in BUILTIN:
        module, _, attr = BUILTIN[type_name].partition(":")
        return getattr(importlib.import_module(module), attr)
    ep = plugins().get(type_name)
    if ep is None:
        raise UnknownSinkType(type_name, available())
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise UnknownSinkType(type_name, available())
    return cls


def plugin_validator(type_name: str):
    """A config validator for a plugin type, or None if no such plugin is installed."""
    if type_name not in plugins():
        return None
    cls = sink_class(type_name)
    options_cls = getattr(cls, "options_class", None)
    if isinstance(options_cls, type) and dataclasses.is_dataclass(options_cls):
        from streamtap.config.schema import OptionsValidator

        return OptionsValidator(type_name, options_cls)

    def passthrough(options: Mapping[str, Any], key_path: str) -> dict[str, Any]:
        return dict(options)

    return passthrough


def create(sink_config: Any, *, interface: str | None = None,
           state_dir: str | None = None) -> Sink:
    """Instantiate the sink of a validated `streamtap.config.SinkConfig`."""
    cls = sink_class(sink_config.type)
    name = sink_config.name or sink_config.type
    return cls(name, dict(sink_config.options), interface=interface, state_dir=state_dir)
