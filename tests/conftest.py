"""Fixtures every test shares: a sandbox that keeps the suite out of the user's home and caches."""

from __future__ import annotations

import os
import subprocess

import pytest

# Every cache a conversion, transformers or huggingface_hub may write to.
CACHE_VARIABLES = ("XCLIP_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_XET_CACHE", "XDG_CACHE_HOME")
# Set when pytest started (CI's release workflow caches them between runs): release tests may use
# the real checkpoints there. Anything else runs in temporary folders only.
_GIVEN_AT_START = {name: os.environ.get(name) for name in ("XCLIP_CACHE", "HF_HOME", "HF_HUB_CACHE")}


@pytest.fixture(scope="session", autouse=True)
def session_sandbox(tmp_path_factory):
    """The same sandbox for the whole session, so that module- and session-scoped fixtures (which
    run before any test's own sandbox) never write to the user's home or caches either."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _sandboxed(tmp_path_factory.mktemp("session-sandbox"), monkeypatch, keep_given=False)


@pytest.fixture(autouse=True)
def sandbox(request, tmp_path_factory, monkeypatch):
    """Point every cache (and HOME) at a temporary folder for the test; a `release` test keeps the
    caches that were set explicitly when pytest started, so real downloads are made once."""
    keep_given = request.node.get_closest_marker("release") is not None
    return _sandboxed(tmp_path_factory.mktemp("sandbox"), monkeypatch, keep_given)


def _sandboxed(root, monkeypatch, keep_given: bool):
    for name in CACHE_VARIABLES:
        if keep_given and _GIVEN_AT_START.get(name):
            monkeypatch.setenv(name, _GIVEN_AT_START[name])
        else:
            monkeypatch.setenv(name, str(root / name.lower()))
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "XCLIP_RELEASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads its paths once, at import: point its constants at the sandbox too.
    from huggingface_hub import constants

    hf_home = os.environ["HF_HOME"]
    hub_cache = os.environ["HF_HUB_CACHE"]
    for name, value in (
        ("HF_HOME", hf_home),
        ("HF_HUB_CACHE", hub_cache),
        ("HUGGINGFACE_HUB_CACHE", hub_cache),
        ("HF_ASSETS_CACHE", os.path.join(hf_home, "assets")),
        ("HUGGINGFACE_ASSETS_CACHE", os.path.join(hf_home, "assets")),
        ("HF_XET_CACHE", os.environ["HF_XET_CACHE"]),
        ("HF_TOKEN_PATH", os.path.join(hf_home, "token")),
    ):
        monkeypatch.setattr(constants, name, value, raising=False)
    return root


@pytest.fixture
def fast_network(monkeypatch):
    """Short timeouts and backoff, so that every network failure path takes well under a second."""
    from converter import fetch

    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(fetch, "STALL_TIMEOUT", 2.0)
    monkeypatch.setattr(fetch, "BACKOFF_FACTOR", 0.01)
    monkeypatch.setattr(fetch, "BACKOFF_MAX", 0.05)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (needs root and a mount-capable container; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the patched disk-full test covers this")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the patched test covers this")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
