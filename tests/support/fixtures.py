"""pytest fixtures for the fake upstream: one per session, reset before and after each test.

Load with `pytest_plugins = ["tests.support.fixtures"]` in tests/conftest.py. `upstream` is
session-scoped because starting Distribution and seeding images costs about a second; the
autouse `_fresh_upstream` makes sharing it safe by clearing faults, stalls and counters
around every test that uses it. It only touches the stack when the test (or a fixture it
depends on) asks for `upstream`, so unit tests never start a registry. What a test pushes
stays for the session: use repository names of your own for that.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from .stack import Upstream


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    stack = Upstream(tmp_path_factory.mktemp("upstream"))
    try:
        yield stack.start()
    finally:  # runs on failure too: the registry process is killed by its PID
        stack.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> Iterator[None]:
    # fixturenames is the full closure, so a fixture that uses `upstream` counts too. The
    # isinstance check skips tests where `upstream` is only a parametrize argument's name.
    stack = request.getfixturevalue("upstream") if "upstream" in request.fixturenames else None
    if not isinstance(stack, Upstream):
        yield
        return
    stack.reset()
    yield
    # Faults and stalls must not outlive the test: a held connection would leak into the
    # next one. Records stay, for a failing test's report, until the next reset.
    stack.proxy.clear_faults()
    stack.proxy.up()
