"""streamtap configuration: typed, frozen settings loaded from YAML.

    from streamtap import config
    cfg = config.load("streamtap.yaml", overrides={"capture": {"interface": "eth0"}})
    cfg.reassembly.timeouts.handshake   # float seconds
    cfg.reassembly.limits.memory        # int bytes

Every error is a :class:`ConfigError` whose str() reads ``file:line: key.path: message``.
The settings, their defaults, help and units are declared once, in :mod:`.schema`.
"""

from .loader import default, default_path, dump, load, loads, reference_table
from .schema import (
    SINK_SPEC_KEYS,
    SINK_TYPES,
    CaptureConfig,
    Config,
    ConfigError,
    ControlConfig,
    CouchdbOptions,
    FragmentsConfig,
    JsonlOptions,
    LimitsConfig,
    LoggingConfig,
    OptionsValidator,
    PcapOptions,
    ReassemblyConfig,
    SinkConfig,
    SinkValidator,
    TimeoutsConfig,
    parse_sink_spec,
    setting,
)
from .units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "SINK_SPEC_KEYS",
    "SINK_TYPES",
    "CaptureConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "CouchdbOptions",
    "FragmentsConfig",
    "JsonlOptions",
    "LimitsConfig",
    "LoggingConfig",
    "OptionsValidator",
    "PcapOptions",
    "ReassemblyConfig",
    "SinkConfig",
    "SinkValidator",
    "TimeoutsConfig",
    "default",
    "default_path",
    "dump",
    "format_duration",
    "format_size",
    "load",
    "loads",
    "parse_duration",
    "parse_size",
    "parse_sink_spec",
    "reference_table",
    "setting",
]
