"""Third-party sinks through the entry-point group "streamtap.sinks": a real package is built
and pip-installed into a temporary directory, then the CLI uses it by `type:`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STREAMTAP = str(Path(sys.executable).with_name("streamtap"))

PLUGIN = '''
import json
from dataclasses import dataclass
from streamtap.sinks.base import Result, Sink


@dataclass(frozen=True)
class Options:
    path: str = "ids.txt"


class IdSink(Sink):
    """Writes one line per stream: its id and byte counts."""
    type = "ids"
    options_class = Options

    def open(self):
        self.f = open(self.options["path"], "a")

    def write(self, batch):
        for s in batch:
            self.f.write(json.dumps([s.id, len(s.client_data), len(s.server_data)]) + "\\n")
        return Result.ok()

    def close(self):
        self.f.close()
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "streamtap_ids.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "streamtap-ids"
        version = "1.0"
        [project.entry-points."streamtap.sinks"]
        ids = "streamtap_ids:IdSink"
        [tool.setuptools]
        py-modules = ["streamtap_ids"]
    '''))
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(src)], check=True, capture_output=True)
    return target


def _run(args: list[str], plugin_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    return subprocess.run([STREAMTAP, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_installed_plugin_receives_streams(plugin_path: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample.pcap"
    subprocess.run([sys.executable, str(HERE / "sample.py"), str(sample)], check=True)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"sinks:\n  - type: ids\n    path: {tmp_path / 'ids.txt'}\n")
    r = _run(["-r", str(sample), "--config", str(cfg), "-q"], plugin_path, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    rows = [json.loads(line) for line in (tmp_path / "ids.txt").read_text().splitlines()]
    import streamtap

    expect = [[s.id, len(s.client_data), len(s.server_data)]
              for s in streamtap.reassemble(str(sample))]
    assert sorted(rows) == sorted(expect) and len(rows) == 10


def test_plugin_options_are_validated(plugin_path: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sinks:\n  - type: ids\n    colour: red\n")
    r = _run(["--check-config", "--config", str(cfg)], plugin_path, tmp_path)
    assert r.returncode == 2
    assert "colour" in r.stderr and ":3:" in r.stderr and "Traceback" not in r.stderr


def test_unknown_type_lists_available_including_plugins(plugin_path: Path,
                                                        tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sinks:\n  - type: kafka\n")
    r = _run(["--check-config", "--config", str(cfg)], plugin_path, tmp_path)
    assert r.returncode == 2
    assert "'kafka'" in r.stderr
    for t in ("jsonl", "pcap", "couchdb", "ids"):
        assert t in r.stderr
    assert "Traceback" not in r.stderr
