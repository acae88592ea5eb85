"""Access to the golden fixtures: small checkpoints with what the ORIGINAL implementation computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GOLDENS = Path(__file__).parent / "data" / "goldens"

# (fixture folder, checkpoint file, expected outputs)
CASES = {
    "tiny-a": ("tiny-a", "checkpoint.pth", "expected.npz"),
    "tiny-a-fp16": ("tiny-a", "checkpoint_fp16.pth", "expected_fp16.npz"),
    "tiny-a-training-layout": ("tiny-a", "checkpoint_training_layout.pth", "expected.npz"),
    "tiny-b": ("tiny-b", "checkpoint.pth", "expected.npz"),
}


def checkpoint(case: str) -> Path:
    folder, name, _ = CASES[case]
    return GOLDENS / folder / name


def expected(case: str) -> dict[str, np.ndarray]:
    folder, _, name = CASES[case]
    return dict(np.load(GOLDENS / folder / name))


def inputs(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(GOLDENS / CASES[case][0] / "inputs.npz")
    return torch.from_numpy(data["pixel_values"]), torch.from_numpy(data["input_ids"])


def write_config(case: str, folder: Path) -> Path:
    """The goldens' XCLIPConfig (explicit heads: their widths are below 64), as save_pretrained writes it."""
    from transformers import XCLIPConfig

    h = json.loads((GOLDENS / CASES[case][0] / "hparams.json").read_text())["derived_for_hf"]
    config = XCLIPConfig(
        projection_dim=h["projection_dim"],
        prompt_layers=h["prompt_layers"],
        prompt_num_attention_heads=h["prompt_num_attention_heads"],
        text_config={k.removeprefix("text."): v for k, v in h.items() if k.startswith("text.")},
        vision_config={k.removeprefix("vision."): v for k, v in h.items() if k.startswith("vision.")},
    )
    config.save_pretrained(folder)
    return folder / "config.json"
