"""One rule for tests that need something from the machine: a tool (tshark, setpriv...), root,
network namespaces, the corpus.

On a user's machine such a test skips, and says loudly what did not run. Under CI
(`STREAMTAP_REQUIRE_ALL=1`, which `.ci/run` exports; the older `STREAMTAP_REQUIRE_CORPUS=1` means
the same) it fails instead: a CI machine that lost tshark must not turn green by skipping.

    require.need(require.tool("tshark"))           # inside a test or a fixture
    pytestmark = pytest.mark.requires(netns.available())   # a whole module (see conftest.py)
    @pytest.mark.requires(require.tool("tshark"))          # one test

`requires(reason)` takes what `need` takes: None when everything is there, else the reason.
"""

from __future__ import annotations

import os
import shutil

import pytest

ENV_VARS = ("STREAMTAP_REQUIRE_ALL", "STREAMTAP_REQUIRE_CORPUS")


def required() -> bool:
    """True when a missing requirement must fail the test (CI)."""
    return any(os.environ.get(v) == "1" for v in ENV_VARS)


def need(missing: str | None) -> None:
    """Go on when `missing` is None; else skip loudly, or fail under STREAMTAP_REQUIRE_ALL=1."""
    if missing is None:
        return
    if required():
        pytest.fail(f"{missing} (STREAMTAP_REQUIRE_ALL=1: a missing requirement is a failure)",
                    pytrace=False)
    pytest.skip(f"{missing}: this test did NOT run")


def tool(name: str, package: str | None = None) -> str | None:
    """None when `name` is on the PATH, else the reason (naming the Debian package)."""
    if shutil.which(name) is not None:
        return None
    return f"{name} is not installed (apt-get install {package or name})"
