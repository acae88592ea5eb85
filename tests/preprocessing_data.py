"""The original X-CLIP preprocessing's exact output on real photos, and how far a function is from it.

`data/preprocessing/reference.npz` (see data/preprocessing/README.md): `frame/<name>` uint8 [H, W, 3]
photos and `original224/<name>`, `original336/<name>` uint8 [S, S, 3], what VideoX's test pipeline
(mmcv 1.7.2, OpenCV) made of them before normalisation. `crops.npz`: more shapes, cut from those
photos, with the same pipeline's output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data" / "preprocessing"
SIZES = (224, 336)
MEAN_255 = np.array([123.675, 116.28, 103.53])
STD_255 = np.array([58.395, 57.12, 57.375])
ONE_LEVEL = float(1 / STD_255.min())  # one uint8 step after normalisation, at its largest: 0.01753


@functools.cache
def _load(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name) as archive:
        return {key: archive[key] for key in archive.files}


def reference_frames() -> dict[str, np.ndarray]:
    """The real photos, by name (the name ends in WxH)."""
    data = _load("reference.npz")
    return {key.split("/", 1)[1]: value for key, value in data.items() if key.startswith("frame/")}


def original_output(name: str, image_size: int) -> np.ndarray:
    """What the original pipeline made of reference photo `name`: uint8 [S, S, 3]."""
    return _load("reference.npz")[f"original{image_size}/{name}"]


def crop_cases() -> list[tuple[str, np.ndarray, int, np.ndarray]]:
    """(name, frame cut from a reference photo, image size, the original's uint8 [S, S, 3]) for each crop."""
    data = _load("crops.npz")
    photos = reference_frames()
    cases = []
    for key in sorted(k for k in data if k.startswith("box/")):
        name = key.split("/", 1)[1]
        top, left, height, width, size = (int(v) for v in data[key])
        frame = np.ascontiguousarray(
            photos[str(data[f"source/{name}"])][top : top + height, left : left + width]
        )
        assert frame.shape[:2] == (height, width), name
        cases.append((name, frame, size, data[f"original/{name}"]))
    return cases


def normalise(original_uint8: np.ndarray) -> np.ndarray:
    """The original's Normalize on a uint8 [S, S, 3] crop: float64 [3, S, S]."""
    return ((original_uint8.astype(np.float64) - MEAN_255) / STD_255).transpose(2, 0, 1)


def deviation(pixel_values: torch.Tensor, original_uint8: np.ndarray) -> tuple[float, float]:
    """(mean |Δ|, max |Δ|) between one frame's pixel values [3, S, S] and the original's."""
    diff = np.abs(pixel_values.double().numpy() - normalise(original_uint8))
    return float(diff.mean()), float(diff.max())


def measure(preprocess: Callable[[np.ndarray, int], torch.Tensor], image_size: int) -> tuple[float, float]:
    """(largest per-photo mean |Δ|, largest |Δ|) of `preprocess(frames, size) -> [1, T, 3, S, S]`
    over every reference photo."""
    stats = [
        deviation(preprocess(frame[None], image_size)[0, 0], original_output(name, image_size))
        for name, frame in reference_frames().items()
    ]
    return max(s[0] for s in stats), max(s[1] for s in stats)
