"""The suite never touches the user's home or caches: not in tests, not in module fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from converter.fetch import cache_dir
from tests.conftest import CACHE_VARIABLES


def _homes() -> dict[str, str | None]:
    homes = {name: os.environ.get(name) for name in (*CACHE_VARIABLES, "HOME")}
    return {**homes, "cache_dir": str(cache_dir())}


@pytest.fixture(scope="module")
def seen_by_a_module_fixture() -> dict[str, str | None]:
    return _homes()


def test_module_fixtures_run_in_the_session_sandbox(seen_by_a_module_fixture, tmp_path_factory):
    base = tmp_path_factory.getbasetemp().resolve()
    for name, value in seen_by_a_module_fixture.items():
        assert value and Path(value).resolve().is_relative_to(base), (name, value)


def test_each_test_has_its_own_sandbox(sandbox, seen_by_a_module_fixture):
    for name, value in _homes().items():
        assert value and Path(value).resolve().is_relative_to(sandbox.resolve()), (name, value)
        assert value != seen_by_a_module_fixture[name]
