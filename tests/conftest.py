"""Shared fixtures. The public corpus is reached only through `corpus_dir`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import require
from hypothesis import settings

# Property tests (tests/test_fuzz.py): `make test` runs a small, derandomized profile so CI is
# deterministic and cheap; HYPOTHESIS_PROFILE=long explores for real on a developer's machine.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(missing): None, or why the machine cannot run this test (tests/require.py: "
        "skip loudly, or fail under STREAMTAP_REQUIRE_ALL=1)",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        require.need(*mark.args)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared corpus of public captures and their tshark/tcpflow oracles.

    A user's clone has no ../shared: the tests that need it skip, loudly. CI sets
    STREAMTAP_REQUIRE_ALL=1, and then a missing corpus is a failure, never a skip.
    """
    if (CORPUS / "README.md").is_file():
        return CORPUS
    require.need(f"corpus not found at {CORPUS}: conformance and differential tests")
    return CORPUS  # not reached: need() skipped or failed


@pytest.fixture(scope="session")
def tcpflow() -> str:
    """tcpflow's path (tcpflow 1.6.1 made the corpus oracle); `require.need` when missing."""
    require.need(require.tool("tcpflow"))
    path = shutil.which("tcpflow")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def oracle_tools() -> dict[str, str]:
    """Paths of `tshark` and `tcpflow`, the corpus's two oracles, for tests that run them on a
    capture they build (`require.need` when one is missing)."""
    for name in ("tshark", "tcpflow"):
        require.need(require.tool(name))
    tools = {name: shutil.which(name) for name in ("tshark", "tcpflow")}
    return {name: path for name, path in tools.items() if path is not None}
