"""Shared fixtures. The public corpus is reached only through `corpus_dir`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared corpus of public captures and their tshark/tcpflow oracles.

    A user's clone has no ../shared: the tests that need it skip, loudly. CI sets
    STREAMTAP_REQUIRE_CORPUS=1, and then a missing corpus is a failure, never a skip.
    """
    if (CORPUS / "README.md").is_file():
        return CORPUS
    reason = f"corpus not found at {CORPUS}: conformance and differential tests did NOT run"
    if os.environ.get("STREAMTAP_REQUIRE_CORPUS") == "1":
        pytest.fail(reason + " (STREAMTAP_REQUIRE_CORPUS=1)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of an external tool a test compares against (tshark, tcpflow …).

    Missing: the test skips, loudly; under STREAMTAP_REQUIRE_CORPUS=1 it fails instead, so CI
    never passes a comparison that did not run.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} not found on PATH: the comparison with {name} did NOT run"
    if os.environ.get("STREAMTAP_REQUIRE_CORPUS") == "1":
        pytest.fail(reason + " (STREAMTAP_REQUIRE_CORPUS=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tcpflow() -> str:
    """tcpflow's path (tcpflow 1.6.1 made the corpus oracle); see `require_tool`."""
    return require_tool("tcpflow")
