"""The release tests' spaghetti clip and hub probe (tests/release_clips.py), offline."""

from __future__ import annotations

import time

import numpy as np
import pytest

from converter.errors import ConverterError
from tests import release_clips as R


def test_spaghetti_filenames() -> None:
    assert R.spaghetti_clip_filename(8) == "eating_spaghetti_8_frames.npy"
    assert R.spaghetti_clip_filename(16) == "eating_spaghetti.npy"
    assert R.spaghetti_clip_filename(32) == "eating_spaghetti_32_frames.npy"
    with pytest.raises(ConverterError, match="available frame counts"):
        R.spaghetti_clip_filename(12)


def test_hub_reachable_honours_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert R.hub_reachable() is False
    assert time.monotonic() - start < 0.5


def test_spaghetti_unreachable_hub_fails_fast(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(R, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads HF_HOME at import time: point its already-imported cache there too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(
        ConverterError, match=r"spaghetti clip eating_spaghetti\.npy not in the local HF cache"
    ):
        R.load_spaghetti_clip(16)
    assert time.monotonic() - start < 5


def test_spaghetti_from_local_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip already in the cache loads without the network (fake cache entry)."""
    monkeypatch.setattr(R, "hub_reachable", lambda timeout=3.0: False)
    frames = np.zeros((8, 4, 4, 3), np.uint8)
    repo_dir = tmp_path / "datasets--hf-internal-testing--spaghetti-video"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    np.save(snapshot / "eating_spaghetti_8_frames.npy", frames)
    assert np.array_equal(R.load_spaghetti_clip(8, cache_dir=tmp_path), frames)
    with pytest.raises(ConverterError, match="eating_spaghetti_32_frames.npy not in the local HF cache"):
        R.load_spaghetti_clip(32, cache_dir=tmp_path)
