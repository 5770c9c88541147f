"""YAML in and out: load/loads with line numbers in every error, dump, the README table.

Loading composes the YAML with PyYAML's safe loader into nodes (which carry marks), turns them
into plain values while recording the 1-based line of every key path, validates the plain values
against the dataclasses in :mod:`.schema`, and puts the line of the offending key path (or of its
nearest ancestor) into the :class:`ConfigError`. CLI overrides are plain values too, validated the
same way, without lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from collections.abc import Mapping
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, get_type_hints

import yaml

from .schema import (
    Config,
    ConfigError,
    SinkConfig,
    SinkTypes,
    build,
    check_sinks,
    describe_type,
    mask_secret,
)
from .units import _show, format_duration, format_size

__all__ = ["default", "default_path", "dump", "load", "loads", "reference_table"]

_INDENT = 2
_WRAP = 96


def default_path() -> Traversable:
    """The shipped ``default.yaml`` (package data of ``streamtap.config``)."""
    return files("streamtap.config") / "default.yaml"


def default() -> Config:
    """The built-in defaults (equal to loading the shipped default.yaml)."""
    return Config()


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    sink_types: SinkTypes | None = None,
) -> Config:
    """Load a YAML config file (None = the shipped default.yaml), then apply ``overrides``.

    ``sink_types`` (``streamtap.sinks.registry.sink_types()``) checks each sink's options now,
    with the YAML line in errors, fills in their defaults and turns ``keep_packets`` on for a
    sink that needs the packets; without it, sink options stay as given, and
    ``streamtap.sinks.registry.build_sinks`` checks them.

    ``overrides`` is a nested mapping of plain values applied on top of the file (mappings merge,
    anything else, lists included, replaces); dotted keys (``"capture.snaplen"``) are expanded. A
    None value sets the key to null. Durations and sizes may be numbers or strings ("10m",
    "1MiB"). Errors in overrides carry the key path and no line.
    """
    if path is None:
        ref = default_path()
        source = "default.yaml"
        try:
            text = ref.read_text(encoding="utf-8")
        except OSError as exc:  # a broken install
            raise ConfigError(f"cannot read the shipped config: {exc}", source=str(ref)) from exc
    else:
        source = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file: {exc.strerror or exc}", source=source
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"cannot read config file: not UTF-8 ({exc})", source=source) from exc
    return loads(text, source, overrides=overrides, sink_types=sink_types)


def loads(
    text: str,
    source: str = "<string>",
    *,
    overrides: Mapping[str, Any] | None = None,
    sink_types: SinkTypes | None = None,
) -> Config:
    """Load a config from YAML text; ``source`` names it in errors. Empty text = defaults.
    ``overrides`` and ``sink_types``: see :func:`load`."""
    data, lines = _parse(text, source)
    cfg = _validate(data, lines, source, sink_types)
    if overrides:
        over = _expand(overrides, "")
        # report errors against the overrides' own key paths
        _validate(over, {}, None, sink_types)
        cfg = _validate(_merge(data, over), {}, None, sink_types)
    return cfg


# --------------------------------------------------------------------------- YAML -> values


def _parse(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Plain values of the document's top-level mapping, and ``{key_path: line}``."""
    lines: dict[str, int] = {}
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return {}, lines
        data = _value(loader, node, "", lines, set())
    except ConfigError as exc:
        exc.source = source
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and problem.startswith("but "):
            problem = f"{exc.context}, {problem}"
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {problem}", line=line, source=source) from None
    except yaml.reader.ReaderError as exc:  # bad characters: a position, no mark
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"invalid YAML: character {_codepoint(exc.character)} is not allowed",
            line=line,
            source=source,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {_show(data)}",
            line=node.start_mark.line + 1,
            source=source,
        )
    return data, lines


_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _codepoint(character: int | str) -> str:
    code = character if isinstance(character, int) else ord(character[:1] or " ")
    return f"U+{code:04X}"


def _value(
    loader: yaml.SafeLoader, node: yaml.Node, path: str, lines: dict[str, int], stack: set[int]
) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node, deep=True)
    if id(node) in stack:
        raise ConfigError("recursive YAML alias", path or None, node.start_mark.line + 1)
    expected = _SEQ_TAG if isinstance(node, yaml.SequenceNode) else _MAP_TAG
    if node.tag != expected:  # the safe loader would refuse it too; we walk nodes ourselves
        raise ConfigError(f"invalid YAML: unsupported tag {node.tag!r}", path or None, _line(node))
    stack.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, child in enumerate(node.value):
                sub = f"{path}[{i}]"
                lines.setdefault(sub, child.start_mark.line + 1)
                items.append(_value(loader, child, sub, lines, stack))
            return items
        assert isinstance(node, yaml.MappingNode)
        loader.flatten_mapping(node)  # "<<" merge keys
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain scalars", path or None, line)
            key = loader.construct_object(key_node, deep=True)
            sub = f"{path}.{key}" if path else str(key)
            if key in result:
                raise ConfigError(f"duplicate key {_show(key)}", sub, line)
            lines.setdefault(sub, line)
            result[key] = _value(loader, value_node, sub, lines, stack)
        return result
    finally:
        stack.discard(id(node))


_LAST_STEP = re.compile(r"(?:\.[^.\[\]]*|\[\d+\])$")


def _line_for(key_path: str | None, lines: Mapping[str, int]) -> int | None:
    """The line of ``key_path``, else of its nearest ancestor that appears in the file."""
    path = key_path or ""
    while path:
        if path in lines:
            return lines[path]
        shorter = _LAST_STEP.sub("", path)
        if shorter == path:
            break
        path = shorter
    return None


def _validate(
    data: Any, lines: Mapping[str, int], source: str | None, sink_types: SinkTypes | None
) -> Config:
    try:
        cfg: Config = build(Config, data, "")
        if sink_types is not None:
            cfg = check_sinks(cfg, sink_types)
    except ConfigError as exc:
        if exc.line is None:
            exc.line = _line_for(exc.key_path, lines)
        if exc.source is None:
            exc.source = source
        raise
    return cfg


def _expand(overrides: Any, path: str) -> Any:
    """Copy of ``overrides`` with dotted keys turned into nested mappings."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping, got {_show(overrides)}", path or None)
    result: dict[Any, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            value = _expand(value, f"{path}.{key}" if path else str(key))
        if isinstance(key, str) and "." in key:
            head, rest = key.split(".", 1)
            key, value = head, {rest: value}
            value = _expand(value, f"{path}.{head}" if path else head)
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            value = _merge(result[key], value)
        result[key] = value
    return result


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return over


# --------------------------------------------------------------------------- values -> YAML


def _human(value: Any, unit: str | None) -> Any:
    """A setting's value as written in YAML: durations and sizes in human units."""
    if unit == "duration" and isinstance(value, int | float):
        return format_duration(value)
    if unit == "size" and isinstance(value, int) and not isinstance(value, bool):
        text = format_size(value)
        return int(text) if text.isdigit() else text
    return value


def _scalar(value: Any) -> str:
    """One value as a single-line YAML scalar (or flow collection)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str | list | dict):
        text = yaml.safe_dump(value, default_flow_style=True, width=2**31, allow_unicode=True)
        text = text.removesuffix("\n").removesuffix("\n...")
        if "\n" not in text:
            return text
        return json.dumps(value, ensure_ascii=False)  # JSON is valid flow YAML
    raise TypeError(f"cannot write {value!r} as YAML")


def _comment(text: str, indent: int, hang: int = 0) -> list[str]:
    pad = " " * indent
    width = max(_WRAP - indent - 2, 40)
    lead = " " * (len(text) - len(text.lstrip(" ")))
    wrapped = textwrap.wrap(
        text.lstrip(" "), width, initial_indent=lead, subsequent_indent=lead + " " * hang
    )
    return [f"{pad}# {line}" for line in wrapped]


def _field_help(f: dataclasses.Field[Any], tp: Any) -> str:
    text = f.metadata.get("help", "")
    kind = describe_type(tp, f.metadata.get("unit"))
    if " | " in kind:
        text = f"{text} One of: {kind.replace(' | ', ', ')}."
    return text


def _options_fields(options_class: type | None) -> dict[str, dataclasses.Field[Any]]:
    if options_class is None or not dataclasses.is_dataclass(options_class):
        return {}
    return {f.name: f for f in dataclasses.fields(options_class)}


def _options_classes(sink_types: SinkTypes | None) -> list[tuple[str, type | None]]:
    if sink_types is None:
        return []
    out = []
    for name in sink_types.names():
        sink_type = sink_types.get(name)
        out.append((name, sink_type.options_class if sink_type is not None else None))
    return out


def _shown(value: Any, f: dataclasses.Field[Any] | None, redact: bool) -> Any:
    if f is None:
        return value
    if redact and f.metadata.get("secret"):
        return mask_secret(value)
    return _human(value, f.metadata.get("unit"))


def _emit_sinks(sinks: tuple[SinkConfig, ...], indent: int, redact: bool,
                out: list[str]) -> None:
    pad = " " * indent
    for sink in sinks:
        items: list[tuple[str, Any]] = [("type", sink.type)]
        if sink.name is not None:
            items.append(("name", sink.name))
        fields = _options_fields(sink.options_class)
        items += [(k, _shown(v, fields.get(k), redact)) for k, v in sink.options.items()]
        for i, (key, value) in enumerate(items):
            lead = "- " if i == 0 else "  "
            out.append(f"{pad}{lead}{_scalar(key)}: {_scalar(value)}")


def _sink_types_comment(indent: int, sink_types: SinkTypes | None) -> list[str]:
    lines: list[str] = []
    for type_name, cls in _options_classes(sink_types):
        if cls is None:
            lines += _comment(f"type: {type_name}", indent)
            continue
        lines += _comment(f"type: {type_name} -- {cls.__doc__ or ''}", indent)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                shown = _scalar(_human(f.default, f.metadata.get("unit")))
                default_text = f" (default {shown})"
            else:
                default_text = ""
            text = f"  {f.name}: {_field_help(f, hints[f.name])}{default_text}"
            lines += _comment(text, indent, hang=2)
    pad = " " * indent
    lines += [f"{pad}# {line}".rstrip() for line in _SINKS_EXAMPLE.splitlines()]
    return lines


_SINKS_EXAMPLE = """\
Example:
  sinks:
    - type: jsonl
      path: /var/lib/streamtap/streams.jsonl
      payload_encoding: hex
    - type: couchdb
      name: archive
      url: http://127.0.0.1:5984"""


def _emit(obj: Any, indent: int, comments: bool, redact: bool, out: list[str],
          sink_types: SinkTypes | None) -> None:
    pad = " " * indent
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if comments:
            if indent == 0 and out:
                out.append("")
            out += _comment(_field_help(f, hints[f.name]), indent)
            if f.name == "sinks" and indent == 0:
                out += _comment("Sink types and their keys:", indent)
                out += _sink_types_comment(indent, sink_types)
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            _emit(value, indent + _INDENT, comments, redact, out, sink_types)
        elif f.name == "sinks" and isinstance(value, tuple) and value:
            out.append(f"{pad}{f.name}:")
            _emit_sinks(value, indent + _INDENT, redact, out)
        elif isinstance(value, tuple) and value:
            out.append(f"{pad}{f.name}:")
            out += [f"{pad}  - {_scalar(item)}" for item in value]
        else:
            out.append(f"{pad}{f.name}: {_scalar(_shown(value, f, redact))}")


_HEADER = """\
# streamtap configuration (YAML).
# Durations: 500ms, 30s, 10m, 1h, 1h30m; a plain number is seconds.
# Sizes: 64KiB, 1MiB, 1GiB (powers of 1024), 1KB, 1MB (powers of 1000); a plain number is bytes.
# Every key is optional: a missing key takes the default shown here."""


def dump(
    cfg: Config,
    *,
    comments: bool = False,
    redact: bool = True,
    sink_types: SinkTypes | None = None,
) -> str:
    """The config as YAML, valid input for :func:`load`; durations and sizes in human units.

    ``comments=True`` adds each setting's help as a comment; with ``sink_types`` it also lists
    every sink type's keys (the shipped default.yaml is ``dump(default(), comments=True,
    sink_types=streamtap.sinks.registry.sink_types())``). Secrets (passwords, a URL's userinfo)
    are masked unless ``redact=False``: the output lands in terminals, tickets and logs.
    """
    out: list[str] = _HEADER.splitlines() + [""] if comments else []
    body: list[str] = []
    _emit(cfg, 0, comments, redact, body, sink_types)
    return "\n".join(out + body) + "\n"


# --------------------------------------------------------------------------- README table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, prefix: str, obj: Any,
          sink_types: SinkTypes | None = None) -> list[tuple[str, str, str, str]]:
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        unit = f.metadata.get("unit")
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and obj is not None:
            rows += _rows(tp, f"{key}.", getattr(obj, f.name), sink_types)
            continue
        if f.name == "sinks" and cls is Config:
            rows.append((f"`{key}`", "`[]`", "", _field_help(f, tp)))
            rows += _sink_rows(sink_types)
            continue
        if f.metadata.get("internal"):
            continue
        if obj is not None:
            value = getattr(obj, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if value is dataclasses.MISSING:
            shown = "required"
        else:
            shown = f"`{_scalar(_human(value, unit))}`"
        rows.append((f"`{key}`", shown, unit or "", _field_help(f, tp)))
    return rows


def _sink_rows(sink_types: SinkTypes | None) -> list[tuple[str, str, str, str]]:
    rows = [r for r in _rows(SinkConfig, "sinks[].", None) if r[0] != "`sinks[].options`"]
    for type_name, cls in _options_classes(sink_types):
        if cls is not None:
            rows += _rows(cls, f"sinks[type={type_name}].", None)
    return rows


def reference_table(sink_types: SinkTypes | None = None) -> str:
    """Markdown table of every setting (key path, default, unit, description) for the README.

    Sink options appear as ``sinks[type=jsonl].path`` for every type of ``sink_types`` that
    declares an options class.
    """
    rows = _rows(Config, "", default(), sink_types)
    lines = ["| Key | Default | Unit | Description |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
