"""The per-model suite's synthetic data: each model's seeded full-size original checkpoint, its clip,
and the stored oracle outputs `tests/data/synthetic/<model>.npz` (open_clip-style goldens).

Rewrite the stored outputs (after a deliberate change to the synthetic weights, the clip or the
oracle) with

    python -m tests.update_synthetic [MODEL ...]      # default: all 18

`pytest tests/test_models.py --update-synthetic` does the same through the suite.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converter.cli import DEFAULT_TEXTS
from converter.config import hyper_for_variant
from converter.registry import VARIANTS, Variant
from converter.synthetic import make_state_dict

STORED = Path(__file__).parent / "data" / "synthetic"


def synthetic_original(variant: Variant) -> dict[str, torch.Tensor]:
    """The model's seeded full-size original state dict (the seed is its name's CRC)."""
    return make_state_dict(hyper_for_variant(variant), seed=zlib.crc32(variant.name.encode()))


def synthetic_clip(frames: int, seed: int = 0) -> np.ndarray:
    """A uint8 clip [T, 240, 320, 3]: smooth gradients plus noise, so preprocessing matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x / 320, y / 240, (x + y) / 560], axis=-1) * 200
    clip = base[None] + rng.normal(0, 25, (frames, 240, 320, 3)) + np.arange(frames)[:, None, None, None]
    return np.clip(clip, 0, 255).astype(np.uint8)


def suite_inputs(processor: Any, frames: int) -> dict[str, torch.Tensor]:
    """What the suite feeds both models: the default texts and the synthetic clip, through `processor`."""
    return processor(
        text=list(DEFAULT_TEXTS), videos=list(synthetic_clip(frames)), return_tensors="pt", padding=True
    )


def stored_path(name: str) -> Path:
    return STORED / f"{name}.npz"


def write(name: str, outputs: dict[str, torch.Tensor]) -> Path:
    STORED.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(stored_path(name), **{k: v.numpy() for k, v in outputs.items()})
    return stored_path(name)


def main(names: list[str]) -> int:
    """Compute the oracle's outputs as the suite feeds it: the saved processor's pixels and ids."""
    from converter.processing import build_processor
    from tests.helpers import oracle_outputs

    for name in names or list(VARIANTS):
        variant = VARIANTS[name]
        inputs = suite_inputs(build_processor(variant.image_size), variant.frames)
        outputs = oracle_outputs(synthetic_original(variant), inputs["pixel_values"], inputs["input_ids"])
        print(f"wrote {write(name, outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
