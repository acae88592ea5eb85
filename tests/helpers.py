"""Shared test builders: the golden fixtures (small checkpoints with what the ORIGINAL implementation
computed) and the small hyper-parameter sets the rule and CLI tests convert."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from converter.config import Hyper
from converter.oracle import OriginalHeads, original_sites
from converter.verify import ORACLE_KEYS, Site, Verification, config_heads, read_sites

if TYPE_CHECKING:
    from transformers import XCLIPModel

GOLDENS = Path(__file__).parent / "data" / "goldens"
# The final outputs `original_forward` returns: the arrays of the goldens' expected.npz.
OUTPUTS = (
    *("vision_last_hidden_state", "vision_pooled", "cls_features", "mit_last_hidden_state", "video_embeds"),
    *("text_last_hidden_state", "text_pooled", "text_embeds_raw"),
    *("img_features", "prompts", "text_embeds"),
    *("video_embeds_normalized", "text_embeds_normalized", "logit_scale_exp", "logits"),
)

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


def golden_heads(case: str) -> OriginalHeads:
    """The explicit head counts of a golden (its widths are below 64, so no rule gives them)."""
    hp = json.loads((GOLDENS / CASES[case][0] / "hparams.json").read_text())
    return OriginalHeads(hp["vision_heads"], hp["transformer_heads"], hp["mit_heads"], hp["prompts_heads"])


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


# W != TW != E, MIT heads != prompt heads, and >= 11 layers so that indices 10+ are matched.
UNEVEN = Hyper(
    embed_dim=48, image_size=32, patch_size=8, frames=3,
    vision_width=96, vision_layers=11, vision_heads=3, vision_mlp=384,
    text_width=64, text_layers=12, text_heads=4, text_mlp=256,
    vocab_size=100, context_length=77,
    mit_layers=2, mit_heads=3, mit_mlp=192, prompt_layers=2, prompt_heads=2,
)  # fmt: skip
# W == TW == E, so a missing or extra transpose keeps its shape and only the numbers can catch it.
SQUARE = dataclasses.replace(
    UNEVEN, embed_dim=64, vision_width=64, vision_heads=4, vision_mlp=256, mit_heads=4, mit_mlp=256,
    vision_layers=2, text_layers=2, mit_layers=1,
)  # fmt: skip


heads = config_heads  # the explicit head counts of a small test model (its widths may be below 64)


def run(*args: object) -> int:
    """xclip-convert's main() on any argument objects (paths included), as a shell would pass them."""
    from converter.cli import main

    return main([str(a) for a in args])


def original_forward(
    state_dict: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, torch.Tensor]:
    """The original X-CLIP's `OUTPUTS` for pixel_values [B, T, 3, H, W] and input_ids [K, L]."""
    return {
        name: t for name, t in original_sites(state_dict, pixel_values, input_ids, heads) if name in OUTPUTS
    }


def oracle_outputs(
    original_state_dict: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, torch.Tensor]:
    """The oracle's outputs under the names of `verify.ORACLE_KEYS`."""
    out = original_forward(original_state_dict, pixel_values, input_ids, heads)
    return {name: out[key] for name, key in ORACLE_KEYS.items()}


def hf_outputs(
    model: XCLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """XCLIPModel's outputs under the names of `verify.ORACLE_KEYS` (the other sites are not kept)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        if name in ORACLE_KEYS:
            captured[name] = tensor

    read_sites(model, pixel_values, input_ids, keep)
    return {name: captured[name] for name in ORACLE_KEYS}


def compare(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], atol: float
) -> Verification:
    """Compare every output in `expected` (extra outputs in `actual` are ignored)."""
    sites = (Site.measure(name, want, actual[name], atol) for name, want in expected.items())
    return Verification.of(sites, atol)
