"""What the release tests share: the clip ("eating spaghetti" from the hub,
hf-internal-testing/spaghetti-video), a quick probe of whether the hub is reachable (so an offline run
skips at once instead of retrying), and the real checkpoint or a skip naming what is missing."""

from __future__ import annotations

import functools
import os
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from converter import fetch
from converter.errors import ConverterError
from converter.processing import load_npy

SPAGHETTI_REPO = "hf-internal-testing/spaghetti-video"
SPAGHETTI_FILES = {
    8: "eating_spaghetti_8_frames.npy",
    16: "eating_spaghetti.npy",
    32: "eating_spaghetti_32_frames.npy",
}


def spaghetti_clip_filename(num_frames: int) -> str:
    """File in ``SPAGHETTI_REPO`` holding the "eating spaghetti" clip with ``num_frames`` frames."""
    try:
        return SPAGHETTI_FILES[num_frames]
    except (KeyError, TypeError):
        raise ConverterError(
            f"no spaghetti test clip with {num_frames!r} frames: available frame counts are "
            f"{sorted(SPAGHETTI_FILES)}; pass your own clip with a matching frame count instead."
        ) from None


def _env_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@functools.cache
def _probe(url: str, timeout: float) -> bool:
    result: list[bool] = []

    def head() -> None:
        try:
            # urllib honours HTTPS_PROXY like the hub client does, so a proxied hub counts as reachable.
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered (even 4xx/5xx): the network path works
        except urllib.error.URLError as exc:
            # A TLS failure still means the host answered; let the hub client report its own error.
            result.append(isinstance(exc.reason, ssl.SSLError))
        except (OSError, ValueError):
            result.append(False)

    # A thread because name resolution ignores socket timeouts and can hang for tens of seconds.
    worker = threading.Thread(target=head, name="xclip-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` s (False under ``HF_HUB_OFFLINE=1``).

    Probed once per process and endpoint: callers use it to skip hf_hub_download's ~23 s retries.
    """
    if _env_offline():
        return False
    return _probe(_hub_endpoint(), float(timeout))


def load_spaghetti_clip(num_frames: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """The "eating spaghetti" test clip ``[T, H, W, 3]`` uint8 with ``num_frames`` in {8, 16, 32}.

    Downloaded from the hub (``SPAGHETTI_REPO``, a dataset) or, when the hub is unreachable, taken
    from the local HF cache only.
    """
    filename = spaghetti_clip_filename(num_frames)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    online = hub_reachable()
    try:
        local = hf_hub_download(
            SPAGHETTI_REPO,
            filename,
            repo_type="dataset",
            cache_dir=cache_dir,
            # Offline: look in the cache only, skipping the client's long connection retries.
            local_files_only=not online,
        )
    except (OSError, EntryNotFoundError) as exc:
        if not online:
            raise ConverterError(
                f"spaghetti clip {filename} not in the local HF cache and the hub is unreachable: "
                f"connect to the internet once (or run where {SPAGHETTI_REPO} was downloaded before), "
                f"or use your own clip (a .npy array of frames or a video file) instead."
            ) from exc
        raise ConverterError(
            f"could not download spaghetti clip {filename} from the dataset {SPAGHETTI_REPO}: {exc}"
        ) from exc
    frames = load_npy(local)
    if len(frames) != num_frames:
        raise ConverterError(
            f"spaghetti clip {local} has {len(frames)} frames, expected {num_frames} "
            f"(shape {tuple(frames.shape)}): delete it from the HF cache and retry."
        )
    return frames


# ---- the real checkpoint, shared by tests/test_models.py and tests/test_audit.py ------------------


def unavailable(config, reason: str):
    if config.getoption("--require-release"):
        pytest.fail(f"--require-release: {reason}")
    pytest.skip(reason)


def real_checkpoint(config, variant) -> Path:
    """--checkpoint-dir, then the cache, then the network; skip (or fail) naming what is missing."""
    directory = config.getoption("--checkpoint-dir")
    if directory:
        for filename in (variant.source.filename, f"{variant.name}.pth"):
            if (Path(directory) / filename).is_file():
                return Path(directory) / filename
    if (cached := fetch.cached_source(variant.source)) is not None:
        return cached
    try:
        return fetch.fetch_source(variant.source)
    except ConverterError as err:
        where = f"--checkpoint-dir {directory}" if directory else "no --checkpoint-dir"
        unavailable(
            config,
            f"real checkpoint {variant.source.filename} for {variant.name} not found ({where}, not in "
            f"{fetch.cache_dir()}) and not downloadable: {err}",
        )
