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


@pytest.fixture(scope="session")
def oracle_tools() -> dict[str, str]:
    """Paths of `tshark` and `tcpflow`, the corpus's two oracles, for tests that run them on a
    capture they build. Missing: a loud skip, or a failure with STREAMTAP_REQUIRE_CORPUS=1."""
    tools = {name: shutil.which(name) for name in ("tshark", "tcpflow")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        reason = f"{', '.join(missing)} not on PATH: the oracle comparison did NOT run"
        if os.environ.get("STREAMTAP_REQUIRE_CORPUS") == "1":
            pytest.fail(reason + " (STREAMTAP_REQUIRE_CORPUS=1)")
        pytest.skip(reason)
    return {name: path for name, path in tools.items() if path is not None}
