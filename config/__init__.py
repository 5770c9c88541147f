"""streamtap configuration: typed, frozen settings loaded from YAML.

    from streamtap import config
    from streamtap.sinks.registry import sink_types
    cfg = config.load("streamtap.yaml", overrides={"capture": {"interface": "eth0"}},
                      sink_types=sink_types())
    cfg.reassembly.timeouts.handshake   # float seconds
    cfg.reassembly.limits.memory        # int bytes

Every error is a :class:`ConfigError` (a ``streamtap.Error``) whose str() reads
``file:line: key.path: message``. The settings, their defaults, help and units are declared once,
in :mod:`.schema`; each sink type declares its own options in the sinks package and reaches this
package as a :class:`SinkTypes` catalog. The directory rules are in :mod:`.paths`. This package
imports nothing of streamtap but :mod:`streamtap.errors`.
"""

from . import paths
from .loader import default, default_path, dump, load, loads, reference_table
from .schema import (
    CaptureConfig,
    Config,
    ConfigError,
    ControlConfig,
    FragmentsConfig,
    LimitsConfig,
    LoggingConfig,
    ReassemblyConfig,
    SinkCatalog,
    SinkConfig,
    SinkType,
    SinkTypes,
    TimeoutsConfig,
    check_sinks,
    setting,
)
from .units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "CaptureConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "FragmentsConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ReassemblyConfig",
    "SinkCatalog",
    "SinkConfig",
    "SinkType",
    "SinkTypes",
    "TimeoutsConfig",
    "check_sinks",
    "default",
    "default_path",
    "dump",
    "format_duration",
    "format_size",
    "load",
    "loads",
    "parse_duration",
    "parse_size",
    "paths",
    "reference_table",
    "setting",
]
