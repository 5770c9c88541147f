"""streamtap.config: units, YAML loading with key paths and lines, overrides, dump, docs."""

from __future__ import annotations

import dataclasses
import pickle
from importlib.resources import files
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from streamtap import config
from streamtap.config import (
    Config,
    ConfigError,
    SinkCatalog,
    SinkConfig,
    SinkType,
    default,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from streamtap.sinks.registry import parse_sink_spec, sink_types

# the config layer checks sink options through the catalog the sinks layer hands it
SINKS = sink_types()


def load(*args: Any, **kw: Any) -> Config:
    return config.load(*args, sink_types=kw.pop("sink_types", SINKS), **kw)


def loads(*args: Any, **kw: Any) -> Config:
    return config.loads(*args, sink_types=kw.pop("sink_types", SINKS), **kw)


def dump(cfg: Config, **kw: Any) -> str:
    return config.dump(cfg, sink_types=kw.pop("sink_types", SINKS), **kw)


def reference_table() -> str:
    return config.reference_table(SINKS)


def _options_classes() -> dict[str, type]:
    out = {}
    for name in SINKS.names():
        st = SINKS.get(name)
        assert st is not None and st.options_class is not None
        out[name] = st.options_class
    return out

MIB = 1024**2

# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        (" 45s ", 45.0),
        ("30", 30.0),
        ("0.25", 0.25),
        ("0", 0.0),
        ("300ms", 0.3),
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("soon", "expected a duration like 30s or 10m, got 'soon'"),
        ("", "expected a duration"),
        ("10", None),  # valid, see below
        ("10 minutes", "expected a duration"),
        ("10M", "expected a duration"),
        ("1h30", "expected a duration"),
        ("s", "expected a duration"),
        ("-5s", "must not be negative"),
        (-1, "must not be negative"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        (float("inf"), "expected a duration"),
        ([1], "expected a duration"),
    ],
)
def test_parse_duration_bad(text: Any, message: str | None) -> None:
    if message is None:
        parse_duration(text)
        return
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1MiB", MIB),
        ("64KiB", 65536),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1MB", 10**6),
        ("1KB", 1000),
        ("1GB", 10**9),
        ("512B", 512),
        ("256 MiB", 256 * MIB),
        ("1mib", MIB),
        ("1.5MiB", 3 * MIB // 2),
        ("4096", 4096),
        ("0", 0),
        (4096, 4096),
        (0, 0),
        (2048.0, 2048),
    ],
)
def test_parse_size(text: Any, nbytes: int) -> None:
    assert parse_size(text) == nbytes
    assert type(parse_size(text)) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("big", "expected a size like 64KiB or 1MiB, got 'big'"),
        ("1M", "expected a size"),  # ambiguous: refused
        ("1K", "expected a size"),
        ("1.5B", "whole number of bytes"),
        ("1.5", "whole number of bytes"),
        ("-1MiB", "must not be negative"),
        (-1, "must not be negative"),
        (1.5, "whole number of bytes"),
        (True, "expected a size"),
        (None, "expected a size"),
        ("", "expected a size"),
        ("MiB", "expected a size"),
    ],
)
def test_parse_size_bad(text: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (30.0, "30s"),
        (600.0, "10m"),
        (3600.0, "1h"),
        (5400.0, "90m"),
        (90.0, "90s"),
        (0.5, "500ms"),
        (1.5, "1500ms"),
        (0.3, "300ms"),
        (0.00025, "250us"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [1e-9, 0.1234567, 1 / 3, 123456.789, 7 * 86400.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0"),
        (MIB, "1MiB"),
        (64 * 1024, "64KiB"),
        (1024**3, "1GiB"),
        (10**6, "1MB"),
        (1000, "1KB"),
        (1500, "1500"),
        (3 * MIB // 2, "1536KiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text
    assert parse_size(text) == nbytes


def test_format_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(-1.0)
    with pytest.raises(ValueError):
        format_size(-1)


# --------------------------------------------------------------------------- loading


def test_partial_config_takes_defaults() -> None:
    cfg = loads("reassembly:\n  timeouts:\n    handshake: 1m\n  limits:\n    depth: 64KiB\n")
    assert cfg.reassembly.timeouts.handshake == 60.0
    assert cfg.reassembly.timeouts.established == 600.0
    assert cfg.reassembly.limits.depth == 65536
    assert cfg.capture == default().capture
    assert cfg.sinks == ()


def test_typed_values() -> None:
    cfg = loads(
        """
capture:
  interface: eth0
  snaplen: 1514
  buffer_size: 8MiB
  promiscuous: false
  filter: tcp port 80
  workers: 4
  fanout_group: 42
  shutdown_timeout: 2500ms
reassembly:
  overlap: last
  emit_empty: false
  keep_packets: true
  fragments: {max_pending: 10, timeout: 5}
control:
  socket: /tmp/x.sock
  listen: 127.0.0.1:9100
  ingest_dirs: [/srv/pcaps/, /tmp]
logging: {level: debug, format: json}
"""
    )
    c = cfg.capture
    assert (c.interface, c.snaplen, c.buffer_size, c.promiscuous) == ("eth0", 1514, 8 * MIB, False)
    assert (c.filter, c.workers, c.fanout_group, c.shutdown_timeout) == ("tcp port 80", 4, 42, 2.5)
    r = cfg.reassembly
    assert (r.overlap, r.emit_empty, r.keep_packets) == ("last", False, True)
    assert (r.fragments.max_pending, r.fragments.timeout) == (10, 5.0)
    assert cfg.control.socket == "/tmp/x.sock"
    assert cfg.control.listen == "127.0.0.1:9100"
    assert cfg.control.ingest_dirs == ("/srv/pcaps", "/tmp")
    assert (cfg.logging.level, cfg.logging.format) == ("debug", "json")


def test_snaplen_zero_means_maximum() -> None:
    assert loads("capture: {snaplen: 0}").capture.snaplen == 262144


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n", "null\n"])
def test_empty_file_is_defaults(text: str) -> None:
    assert loads(text) == default()


def test_empty_sections_are_defaults() -> None:
    assert loads("capture:\nreassembly:\n  timeouts:\nsinks:\ncontrol:\n") == default()


def test_config_is_frozen() -> None:
    cfg = default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.capture.snaplen = 1  # type: ignore[misc]


def test_error_str_format() -> None:
    text = "\n" * 9 + "reassembly:\n  timeouts:\n    handshake: soon\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "config.yaml")
    err = info.value
    assert (err.key_path, err.line, err.source) == (
        "reassembly.timeouts.handshake",
        12,
        "config.yaml",
    )
    assert str(err) == (
        "config.yaml:12: reassembly.timeouts.handshake: "
        "expected a duration like 30s or 10m, got 'soon'"
    )


def test_error_pickles() -> None:
    err = ConfigError("bad", "capture.snaplen", 3, "c.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert (again.key_path, again.line, again.source, str(again)) == (
        "capture.snaplen",
        3,
        "c.yaml",
        str(err),
    )


# (yaml, key_path, line, message fragment)
ERRORS = [
    # unknown keys
    ("bogus: 1\n", "bogus", 1, "unknown key 'bogus' at the top level; known: capture, reassembly"),
    (
        "reassembly:\n  timeouts:\n    handshak: 1s\n",
        "reassembly.timeouts.handshak",
        3,
        "unknown key 'handshak' in reassembly.timeouts (did you mean 'handshake'?); "
        "known: handshake, established, closing, rst_linger, fin_linger",
    ),
    ("capture:\n  snaplen: 1\n  iface: x\n", "capture.iface", 3, "unknown key 'iface' in capture"),
    # wrong types
    ("capture:\n  snaplen: big\n", "capture.snaplen", 2, "expected an integer, got 'big'"),
    ("capture:\n  snaplen: 1.5\n", "capture.snaplen", 2, "expected an integer, got 1.5"),
    ("capture:\n  workers: true\n", "capture.workers", 2, "expected an integer, got true"),
    ("capture:\n  promiscuous: maybe\n", "capture.promiscuous", 2, "expected true or false"),
    ("capture:\n  interface: 5\n", "capture.interface", 2, "expected a string, got 5"),
    ("capture:\n  filter: [tcp]\n", "capture.filter", 2, "expected a string, got a list"),
    ("capture: 5\n", "capture", 1, "expected a mapping, got 5"),
    ("reassembly:\n  limits: [1]\n", "reassembly.limits", 2, "expected a mapping, got a list"),
    ("control:\n  ingest_dirs: /srv\n", "control.ingest_dirs", 2, "expected a list"),
    (
        "control:\n  ingest_dirs:\n    - /a\n    - 7\n",
        "control.ingest_dirs[1]",
        4,
        "expected a str",
    ),
    ("sinks: {type: jsonl}\n", "sinks", 1, "expected a list"),
    # bad durations / sizes
    (
        "reassembly:\n  timeouts:\n    established: forever\n",
        "reassembly.timeouts.established",
        3,
        "expected a duration like 30s or 10m, got 'forever'",
    ),
    (
        "capture:\n  buffer_size: 64M\n",
        "capture.buffer_size",
        2,
        "expected a size like 64KiB or 1MiB, got '64M'",
    ),
    (
        "reassembly:\n  limits:\n    memory: lots\n",
        "reassembly.limits.memory",
        3,
        "expected a size",
    ),
    # bad enum values
    (
        "reassembly:\n  overlap: bsd\n",
        "reassembly.overlap",
        2,
        "expected one of first, last, got 'bsd'",
    ),
    (
        "logging:\n  level: loud\n",
        "logging.level",
        2,
        "expected one of debug, info, warning, error",
    ),
    ("logging:\n  format: xml\n", "logging.format", 2, "expected one of text, json, got 'xml'"),
    # negative numbers and ranges
    ("capture:\n  snaplen: -1\n", "capture.snaplen", 2, "must not be negative, got -1"),
    ("capture:\n  workers: -2\n", "capture.workers", 2, "must not be negative"),
    (
        "reassembly:\n  timeouts:\n    closing: -5s\n",
        "reassembly.timeouts.closing",
        3,
        "must not be negative",
    ),
    (
        "reassembly:\n  limits:\n    depth: -1\n",
        "reassembly.limits.depth",
        3,
        "must not be negative",
    ),
    (
        "reassembly:\n  timeouts:\n    handshake: 0s\n",
        "reassembly.timeouts.handshake",
        3,
        "must be greater than 0",
    ),
    (
        "reassembly:\n  limits:\n    max_flows: 0\n",
        "reassembly.limits.max_flows",
        3,
        "greater than 0",
    ),
    ("capture:\n  snaplen: 300000\n", "capture.snaplen", 2, "must be at most 262144"),
    ("capture:\n  fanout_group: 70000\n", "capture.fanout_group", 2, "must be at most 65535"),
    # control
    (
        "control:\n  listen: 0.0.0.0:9100\n",
        "control.listen",
        2,
        "only 127.0.0.1:PORT is allowed",
    ),
    ("control:\n  listen: localhost:9100\n", "control.listen", 2, "only 127.0.0.1:PORT"),
    ("control:\n  listen: '[::1]:9100'\n", "control.listen", 2, "only 127.0.0.1:PORT"),
    ("control:\n  listen: 127.0.0.1\n", "control.listen", 2, "expected 127.0.0.1:PORT"),
    ("control:\n  listen: 127.0.0.1:99999\n", "control.listen", 2, "expected 127.0.0.1:PORT"),
    (
        "control:\n  ingest_dirs: [/ok, relative/dir]\n",
        "control.ingest_dirs[1]",
        2,
        "expected an absolute path, got 'relative/dir'",
    ),
    # sinks
    (
        "sinks:\n  - type: jsonl\n  - type: kafka\n    topic: x\n",
        "sinks[1].type",
        3,
        "unknown sink type 'kafka'; known types: jsonl, pcap, couchdb",
    ),
    ("sinks:\n  - path: x.jsonl\n", "sinks[0]", 2, "missing required key 'type'"),
    ("sinks:\n  - jsonl\n", "sinks[0]", 2, "expected a mapping with a type key, got 'jsonl'"),
    (
        "sinks:\n  - type: jsonl\n    compress: true\n",
        "sinks[0].compress",
        3,
        "unknown key 'compress' for sink type jsonl (did you mean 'compress_rotated'?); "
        "known: type, name, path",
    ),
    (
        "sinks:\n  - type: jsonl\n    payload_encoding: base32\n",
        "sinks[0].payload_encoding",
        3,
        "expected one of base64, hex, utf8, none, got 'base32'",
    ),
    (
        "sinks:\n  - type: jsonl\n    max_payload: huge\n",
        "sinks[0].max_payload",
        3,
        "expected a size",
    ),
    ("sinks:\n  - type: pcap\n", "sinks[0]", 2, "missing required key 'dir' for sink type pcap"),
    (
        "sinks:\n  - type: couchdb\n    url: ftp://x\n",
        "sinks[0].url",
        3,
        "expected an http:// or https:// URL",
    ),
    (
        "sinks:\n  - type: couchdb\n    url: http://h:5984\n    database: Bad\n",
        "sinks[0].database",
        4,
        "expected a CouchDB database name",
    ),
    (
        "sinks:\n  - {type: jsonl, name: a}\n  - {type: jsonl, name: a, path: x}\n",
        "sinks[1].name",
        3,
        "duplicate sink name 'a'",
    ),
    # YAML-level problems that still have a key path
    ("capture:\n  workers: 1\n  workers: 2\n", "capture.workers", 3, "duplicate key 'workers'"),
    ("capture:\n  1: x\n", "capture.1", 2, "keys must be strings"),
]


@pytest.mark.parametrize(("text", "key_path", "line", "message"), ERRORS)
def test_errors_name_key_path_and_line(text: str, key_path: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "config.yaml")
    err = info.value
    assert err.key_path == key_path
    assert err.line == line
    assert err.source == "config.yaml"
    assert message in err.message
    assert str(err).startswith(f"config.yaml:{line}: {key_path}: ")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("capture:\n  snaplen: [1\n", 3, "invalid YAML"),
        ("capture:\n  snaplen: 1\n interface: x\n", 3, "invalid YAML"),
        ("capture:\n\tsnaplen: 1\n", 2, "invalid YAML"),
        ("a: b: c\n", 1, "mapping values are not allowed here"),
        ("capture: {}\n---\nlogging: {}\n", 2, "expected a single document"),
        ("capture: {}\nx: *nowhere\n", 2, "undefined alias"),
        ("capture: {}\n\x00\n", 2, "U+0000"),
        ("- capture\n- logging\n", 1, "expected a mapping at the top level, got a list"),
        ("\n\njust a string\n", 3, "expected a mapping at the top level, got 'just a string'"),
    ],
)
def test_yaml_level_errors_have_lines(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, "bad.yaml")
    err = info.value
    assert (err.line, err.source, err.key_path) == (line, "bad.yaml", None)
    assert message in str(err)
    assert str(err).startswith(f"bad.yaml:{line}: ")


def test_unsafe_tags_are_refused() -> None:
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        loads("capture:\n  interface: !!python/object/apply:os.getcwd []\n")
    assert info.value.line == 2


def test_anchors_and_merge_keys() -> None:
    cfg = loads(
        "reassembly:\n"
        "  timeouts: &t {handshake: 1m}\n"
        "  fragments:\n    <<: {timeout: 9s}\n    max_pending: 3\n"
        "control:\n  ingest_dirs: &dirs [/a]\n"
    )
    assert cfg.reassembly.timeouts.handshake == 60.0
    assert cfg.reassembly.fragments.timeout == 9.0
    assert cfg.reassembly.fragments.max_pending == 3
    assert cfg.control.ingest_dirs == ("/a",)


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "streamtap.yaml"
    path.write_text("capture:\n  interface: eth1\n  workers: 2\n")
    cfg = load(path)
    assert (cfg.capture.interface, cfg.capture.workers) == ("eth1", 2)
    assert load(str(path)) == cfg


def test_load_file_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "streamtap.yaml"
    path.write_text("capture:\n  workers: many\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (f"{path}:2: capture.workers: expected an integer, got 'many'")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path)  # a directory


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"capture:\n  interface: \xe9th0\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load(path)
    assert info.value.source == str(path)


# --------------------------------------------------------------------------- overrides


def test_overrides_apply_on_top_of_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "capture:\n  interface: eth0\n  snaplen: 1514\n"
        "sinks:\n  - {type: couchdb, url: 'http://127.0.0.1:5984'}\n"
    )
    cfg = load(
        path,
        overrides={
            "capture": {"interface": "eth1", "buffer_size": "2MiB"},
            "reassembly.timeouts.handshake": "5s",
            "reassembly": {"limits": {"depth": 4096}},
            "sinks": [{"type": "jsonl", "path": "-"}],
        },
    )
    assert cfg.capture.interface == "eth1"
    assert cfg.capture.snaplen == 1514  # from the file
    assert cfg.capture.buffer_size == 2 * MIB
    assert cfg.reassembly.timeouts.handshake == 5.0
    assert cfg.reassembly.timeouts.established == 600.0
    assert cfg.reassembly.limits.depth == 4096
    assert [s.type for s in cfg.sinks] == ["jsonl"]  # lists replace


def test_overrides_on_default_file() -> None:
    cfg = load(None, {"capture": {"interface": "lo", "promiscuous": False, "filter": "port 80"}})
    assert (cfg.capture.interface, cfg.capture.promiscuous) == ("lo", False)
    assert cfg.capture.filter == "port 80"
    assert dataclasses.replace(cfg, capture=default().capture) == default()


def test_override_with_sink_config_objects() -> None:
    sink = SinkConfig("jsonl", "out", {"path": "/tmp/o.jsonl"})
    cfg = loads("", overrides={"sinks": (sink,)})
    (got,) = cfg.sinks
    assert (got.type, got.name, got.options["path"]) == ("jsonl", "out", "/tmp/o.jsonl")
    assert got.options["payload_encoding"] == "base64" and got.options["max_payload"] == MIB


def test_override_none_sets_null() -> None:
    cfg = loads("capture: {interface: eth0}", overrides={"capture": {"interface": None}})
    assert cfg.capture.interface is None


@pytest.mark.parametrize(
    ("overrides", "key_path", "message"),
    [
        ({"capture": {"snaplen": "x"}}, "capture.snaplen", "expected an integer, got 'x'"),
        ({"capture.workers": -1}, "capture.workers", "must not be negative"),
        ({"reassembly": {"timeouts": {"closing": "later"}}}, "reassembly.timeouts.closing", ""),
        ({"capture": {"colour": 1}}, "capture.colour", "unknown key 'colour' in capture"),
        ({"control": {"listen": "0.0.0.0:1"}}, "control.listen", "only 127.0.0.1:PORT"),
        ({"sinks": [{"type": "nope"}]}, "sinks[0].type", "known types: jsonl, pcap, couchdb"),
    ],
)
def test_override_errors_have_key_path_and_no_line(
    tmp_path: Path, overrides: dict[str, Any], key_path: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("capture:\n  interface: eth0\n")
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    err = info.value
    assert (err.key_path, err.line, err.source) == (key_path, None, None)
    assert message in err.message
    assert str(err).startswith(f"{key_path}: ")


def test_parse_sink_spec() -> None:
    assert parse_sink_spec("jsonl:-") == {"type": "jsonl", "path": "-"}
    assert parse_sink_spec("pcap:/tmp/p") == {"type": "pcap", "dir": "/tmp/p"}
    assert parse_sink_spec("files:/tmp/f") == {"type": "files", "dir": "/tmp/f"}
    assert parse_sink_spec("couchdb:http://127.0.0.1:5984") == {
        "type": "couchdb",
        "url": "http://127.0.0.1:5984",
    }
    with pytest.raises(ConfigError, match="expected one of jsonl:PATH"):
        parse_sink_spec("kafka:x")
    with pytest.raises(ConfigError):
        parse_sink_spec("jsonl")


# --------------------------------------------------------------------------- sinks


def test_sink_options_get_defaults() -> None:
    cfg = loads(
        "sinks:\n"
        "  - type: jsonl\n    path: /tmp/s.jsonl\n    max_payload: 64KiB\n"
        "  - type: pcap\n    dir: /tmp/p\n    name: packets\n"
        "  - type: couchdb\n    url: http://127.0.0.1:5984\n"
    )
    jsonl, pcap, couch = cfg.sinks
    assert jsonl.type == "jsonl" and jsonl.name is None
    assert jsonl.options["path"] == "/tmp/s.jsonl" and jsonl.options["max_payload"] == 65536
    assert jsonl.options["payload_encoding"] == "base64" and jsonl.options["fsync"] == "never"
    assert pcap.name == "packets" and pcap.options["dir"] == "/tmp/p"
    assert pcap.options["mode"] == "per_stream" and pcap.options["max_open_files"] == 256
    assert couch.options["url"] == "http://127.0.0.1:5984"
    assert couch.options["database"] is None  # not set: the URL names it (no path: streamtap)
    # a pcap sink needs the packets: the reassembler is told to keep them
    assert cfg.reassembly.keep_packets and not default().reassembly.keep_packets


def test_effective_sinks_default_is_stdout_jsonl_base64() -> None:
    (sink,) = default().effective_sinks()
    assert sink.type == "jsonl"
    assert sink.options["path"] == "-"
    assert sink.options["payload_encoding"] == "base64"
    cfg = loads("sinks: [{type: pcap, dir: /x}]")
    assert cfg.effective_sinks() == cfg.sinks


def test_sink_catalog_is_passed_down() -> None:
    def kafka(options: Any, key_path: str) -> None:
        if "topic" not in options:
            raise ConfigError("missing required key 'topic'", key_path)

    catalog = SinkCatalog([*(SINKS.get(n) for n in SINKS.names()),  # type: ignore[misc]
                           SinkType("kafka", check=kafka)])
    cfg = loads("sinks:\n  - type: kafka\n    topic: streams\n", sink_types=catalog)
    assert cfg.sinks[0] == SinkConfig("kafka", None, {"topic": "streams"})
    with pytest.raises(ConfigError) as info:
        loads("sinks:\n  - type: kafka\n", sink_types=catalog)
    assert (info.value.key_path, info.value.line) == ("sinks[0]", 2)
    with pytest.raises(ConfigError, match="known types: jsonl, pcap, couchdb, files, kafka"):
        loads("sinks: [{type: nats}]", sink_types=catalog)
    assert "kafka" in dump(cfg, sink_types=catalog)
    assert loads(dump(cfg), sink_types=catalog) == cfg


def test_without_a_catalog_sink_options_stay_as_given() -> None:
    cfg = config.loads("sinks: [{type: pcap, dir: /x, bogus: 1}]")
    assert cfg.sinks[0].options == {"dir": "/x", "bogus": 1}
    assert not cfg.reassembly.keep_packets  # only the pcap sink's declaration turns it on
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        config.check_sinks(cfg, SINKS)


# --------------------------------------------------------------------------- CouchDB URL


@pytest.mark.parametrize(("url", "database", "expected"), [
    # DESIGN "Pinned details": without database, the last path segment is the database
    ("http://127.0.0.1:5984/streams", None, ("", "streams")),
    ("http://127.0.0.1:5984/streams/", None, ("", "streams")),
    ("http://h/couch/streams", None, ("/couch", "streams")),
    ("http://h/a/b/streams//", None, ("/a/b", "streams")),
    ("http://h:5984/my%2Fdb", None, ("", "my/db")),
    ("http://h:5984/a%24b", None, ("", "a$b")),
    ("http://u:p@h:5984/db", None, ("", "db")),
    # no path segment: the old default name
    ("http://127.0.0.1:5984", None, ("", "streamtap")),
    ("http://127.0.0.1:5984/", None, ("", "streamtap")),
    # an explicit database keeps the whole path as the base
    ("http://127.0.0.1:5984", "x", ("", "x")),
    ("http://h/couch/", "streams", ("/couch", "streams")),
    ("http://h/couch/streams", "other", ("/couch/streams", "other")),
])
def test_couchdb_location(url: str, database: str | None, expected: tuple[str, str]) -> None:
    from streamtap.sinks.couchdb import couchdb_location

    assert couchdb_location(url, database) == expected


def test_couchdb_database_named_by_the_url_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        loads("sinks:\n  - type: couchdb\n    url: http://u:hunter22@h:5984/Streams\n")
    e = info.value
    assert e.key_path == "sinks[0].url" and e.line == 3  # the url line
    assert "last path segment" in e.message and "'Streams'" in e.message
    assert "hunter22" not in str(e)
    # the same segment is only a base path when database is set
    cfg = loads("sinks: [{type: couchdb, url: 'http://h/Proxy', database: streams}]")
    assert cfg.sinks[0].options["database"] == "streams"
    with pytest.raises(ConfigError, match="expected an http") as info:
        loads("sinks: [{type: couchdb, url: 'ftp://u:hunter22@h/x'}]")
    assert "hunter22" not in str(info.value)


def test_dump_masks_couchdb_credentials() -> None:
    cfg = loads("sinks:\n  - type: couchdb\n    url: http://admin:hunter22@h:5984/streams\n"
                "    username: admin\n    password: s3cr3t-pw\n")
    text = dump(cfg)
    assert "hunter22" not in text and "s3cr3t-pw" not in text
    assert "url: http://***@h:5984/streams" in text and "password: '***'" in text
    assert "database: null" in text  # not set: the URL names it
    shown = dump(cfg, redact=False)
    assert "hunter22" in shown and "s3cr3t-pw" in shown
    assert loads(shown) == cfg
    # nothing set, nothing masked: null stays null
    plain = dump(loads("sinks: [{type: couchdb, url: 'http://h:5984/db'}]"))
    assert "password: null" in plain and "url: http://h:5984/db" in plain


# --------------------------------------------------------------------------- control.listen


def test_listen_loopback_accepted_others_rejected() -> None:
    assert loads("control: {listen: '127.0.0.1:0'}").control.listen == "127.0.0.1:0"
    for host in ("0.0.0.0", "10.0.0.1", "::", "example.org"):
        with pytest.raises(ConfigError, match="only 127.0.0.1:PORT"):
            loads(f"control: {{listen: '{host}:9100'}}")


# --------------------------------------------------------------------------- default.yaml and dump


def test_default_yaml_found_as_package_data() -> None:
    ref = files("streamtap.config") / "default.yaml"
    assert ref.is_file()
    assert config.default_path().read_text() == ref.read_text()


def test_default_file_equals_defaults() -> None:
    assert load() == default()
    assert load(None) == Config()


def test_default_file_is_generated_from_the_schema() -> None:
    shipped = (files("streamtap.config") / "default.yaml").read_text(encoding="utf-8")
    assert shipped == dump(default(), comments=True), (
        "config/default.yaml is out of date: regenerate it with "
        "python -c 'from streamtap import config; from streamtap.sinks.registry import sink_types; "
        'open("config/default.yaml", "w").write(config.dump(config.default(), comments=True, '
        'sink_types=sink_types()))\''
    )


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += _leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def test_default_file_has_every_key_with_a_comment() -> None:
    shipped = (files("streamtap.config") / "default.yaml").read_text(encoding="utf-8")
    lines = shipped.splitlines()
    for path in _leaf_paths(Config):
        key = path.rsplit(".", 1)[-1]
        index = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        assert lines[index - 1].lstrip().startswith("#"), f"{path} has no comment"


def test_dump_round_trips_defaults() -> None:
    text = dump(default())
    assert loads(text) == default()
    assert "established: 10m" in text
    assert "ooo_bytes: 1MiB" in text
    assert "memory: 1GiB" in text
    assert loads(dump(default(), comments=True)) == default()


def test_dump_round_trips_non_defaults() -> None:
    cfg = loads(
        """
capture:
  interface: "eth0"
  filter: "tcp port 80 and host 10.0.0.1 # not a comment"
  snaplen: 96
  buffer_size: 1500
  shutdown_timeout: 0.125
reassembly:
  overlap: last
  timeouts: {handshake: 1h30m, rst_linger: 0, fin_linger: 0.1}
  limits: {depth: 1MB, memory: 0}
sinks:
  - type: jsonl
    name: 'yes'
    path: "-"
    payload_encoding: none
  - {type: couchdb, url: 'http://127.0.0.1:5984', database: a-b}
control:
  socket: "/run/streamtap/x: y.sock"
  listen: 127.0.0.1:8080
  ingest_dirs: [/srv/pcaps, "/srv/odd: name"]
logging: {level: error}
"""
    )
    text = dump(cfg)
    assert loads(text) == cfg
    assert loads(dump(cfg, comments=True)) == cfg
    assert "handshake: 90m" in text
    assert "shutdown_timeout: 125ms" in text
    assert "depth: 1MB" in text


@pytest.mark.parametrize(
    "value", ["", "-", "yes", "null", "1:20", "a\nb", "tab\there", "#x", " lead", "é ü", "'\""]
)
def test_dump_quotes_awkward_strings(value: str) -> None:
    cfg = loads("", overrides={"capture": {"filter": value}})
    assert cfg.capture.filter == value
    assert loads(dump(cfg)) == cfg


# --------------------------------------------------------------------------- reference table


def test_reference_table_has_every_key() -> None:
    table = reference_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    keys = {row.split("`")[1] for row in rows}
    for path in _leaf_paths(Config):
        assert path in keys, path
    assert {"sinks[].type", "sinks[].name"} <= keys
    for type_name, options_class in _options_classes().items():
        for f in dataclasses.fields(options_class):
            assert f"sinks[type={type_name}].{f.name}" in keys
    assert "| `reassembly.timeouts.established` | `10m` | duration |" in table
    assert "| `reassembly.limits.memory` | `1GiB` | size |" in table
    assert table.startswith("| Key | Default | Unit | Description |\n| --- |")


def test_every_setting_has_help() -> None:
    def check(cls: type) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f.metadata.get("unit", None) in (None, "duration", "size")
            if dataclasses.is_dataclass(hints[f.name]):
                check(hints[f.name])

    check(Config)
    for options_class in _options_classes().values():
        check(options_class)
