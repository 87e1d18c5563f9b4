"""System tools some tests need (chromium, chromedriver and the CJK fonts, Go): skipped on a laptop without them,
failed in CI."""
import os

import pytest


def require_tool(missing):
    """For a test that needs a system tool (chromium and chromedriver, the CJK fonts, Go): `missing` is why it
    cannot run here, or None. A laptop without the tool skips with the reason; under CI=true, where .ci/run
    installs every such tool, the test fails instead, so a CI whose install step broke cannot go green by skipping."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{missing} (CI=true: .ci/run installs it, so its absence is a broken CI, not a skip)",
                    pytrace=False)
    pytest.skip(missing)
