"""Prove a conversion: the converted XCLIPModel against the independent original forward pass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter.config import Hyper
from converter.errors import VerificationError
from converter.oracle import OriginalHeads, original_forward

if TYPE_CHECKING:
    from transformers import XCLIPModel

DEFAULT_ATOL = 1e-4  # goldens: a correct conversion is within ~5e-6, any wrong key moves logits >= 7e-3
NUM_TEXTS = 3


@dataclass(frozen=True)
class Verification:
    """Max |Δ| between the converted model and the original, per output."""

    max_abs_diff: dict[str, float]
    atol: float

    @property
    def passed(self) -> bool:
        return all(d <= self.atol for d in self.max_abs_diff.values())

    def summary(self) -> str:
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.max_abs_diff.items())
        verdict = "OK" if self.passed else "FAILED"
        return f"verification {verdict}: max |Δ| {diffs} (atol {self.atol:g})"


def synthetic_inputs(
    hyper: Hyper, videos: int = 1, texts: int = NUM_TEXTS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded clip [videos, T, 3, S, S] and token ids [texts, L] laid out as CLIP's tokenizer does:
    start token, a few ids, end token (the row maximum, where both models pool), then zeros."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(videos, hyper.frames, 3, hyper.image_size, hyper.image_size, generator=gen)
    input_ids = torch.zeros(texts, hyper.context_length, dtype=torch.long)
    sot, eot = hyper.vocab_size - 2, hyper.vocab_size - 1
    for row in range(texts):
        n = 3 + 2 * row
        input_ids[row, 0] = sot
        input_ids[row, 1 : n + 1] = torch.randint(1, hyper.vocab_size - 2, (n,), generator=gen)
        input_ids[row, n + 1] = eot
    return pixel_values, input_ids


@torch.no_grad()
def hf_outputs(
    model: XCLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    return {"logits": out.logits_per_video, "video_embeds": out.video_embeds, "text_embeds": out.text_embeds}


def oracle_outputs(
    original_state_dict: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, torch.Tensor]:
    out = original_forward(original_state_dict, pixel_values, input_ids, heads=heads)
    return {
        "logits": out["logits"],
        "video_embeds": out["video_embeds_normalized"],
        "text_embeds": out["text_embeds_normalized"],
    }


def compare(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], atol: float
) -> Verification:
    diffs = {}
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            raise VerificationError(f"{name}: shape {list(got.shape)} vs the original's {list(want.shape)}")
        diffs[name] = (got.float() - want.float()).abs().max().item()
    return Verification(diffs, atol)


def verify(
    model: XCLIPModel,
    original_state_dict: Mapping[str, torch.Tensor],
    hyper: Hyper,
    atol: float = DEFAULT_ATOL,
    heads: OriginalHeads | None = None,
) -> Verification:
    """Run both implementations on the same deterministic inputs and compare.

    `heads` defaults to the original's own rule (width // 64), NOT the config's head counts, so a
    config with wrong heads is caught rather than reproduced by the oracle.
    """
    pixel_values, input_ids = synthetic_inputs(hyper)
    expected = oracle_outputs(original_state_dict, pixel_values, input_ids, heads)
    return compare(expected, hf_outputs(model, pixel_values, input_ids), atol)
