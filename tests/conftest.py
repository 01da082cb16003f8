"""Suite-wide rules.

* Tests marked ``root`` need root (netns, veth, BPF). They skip on a non-root laptop; under
  ``CI=true`` any skip of a root test is turned into a failure, so CI cannot go green without them.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
IS_ROOT = os.geteuid() == 0


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and not IS_ROOT:
        if IN_CI:
            pytest.fail("root test cannot run: not root (CI=true makes this a failure)")
        pytest.skip("needs root")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    if IN_CI and rep.skipped and item.get_closest_marker("root"):
        rep.outcome = "failed"
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.longrepr = f"root test skipped under CI=true (a skip is a failure here): {reason}"


@pytest.fixture
def lab():
    """A network lab (namespaces + veth endpoints) removed after the test, pass or fail."""
    from flowscope.netlab import Lab

    with Lab() as lab:
        yield lab
