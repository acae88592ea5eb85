"""Prove a conversion: the converted XCLIPModel against the independent original forward pass.

Inputs. A deterministic clip with structure across space and time: one scene of 16x16-pixel
blocks shared by all frames, a per-frame, per-channel offset, and pixel noise (roughly N(0, 1),
the scale of normalised images). I.i.d. noise pixels make every patch and every frame alike, so
the cross-frame message attention, the MIT and the prompt generator's cross-attention see nearly
identical tokens and a mistake there hardly moves the outputs; the shared scene and the per-frame
offsets give them real structure. Token ids: rows of different lengths, each ending with the end
token (the row maximum, where both models pool), as CLIP's tokenizer lays them out.

Outputs compared. Besides the logits and the two normalised embeddings, the intermediate results
each family of mistakes moves most directly: the per-frame features before the MIT
(`cls_features`), the MIT output, the patch features the prompt generator attends to
(`img_features`), the raw text embeddings and the video-specific prompts. On the HF side they are
read from XCLIPModel's own outputs and forward hooks on its modules, not recomputed.

Tolerance. Each output o passes when

    max |HF_o - original_o|  <=  atol * max |original_o|

i.e. `atol` (the CLI's `--atol`, default `DEFAULT_ATOL`) is the largest difference allowed
relative to the output's own magnitude. Outputs differ in scale by orders of magnitude (logits
~10, normalised embeddings ~0.05, prompts ~alpha), and float32 rounding follows each output's
scale, so one absolute tolerance is either too loose for the small outputs or too tight for the
large ones. `Verification.margin` is the largest ratio |Δ| / tolerance over the outputs: below 1
passes; a planted mistake fails by that factor (benchmarks/verification_power.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter.clip import HEAD_DIM
from converter.config import Hyper
from converter.errors import VerificationError
from converter.oracle import OriginalHeads, original_forward

if TYPE_CHECKING:
    from transformers import XCLIPModel

# Relative to each output's largest magnitude, chosen between two measurements: the ORIGINAL
# code's outputs on the goldens differ from the converted model's by <= 7.4e-7 relative (27x
# headroom; the oracle and XCLIPModel agree bit for bit at full size), and the subtlest planted
# mistake at full size moves an output by 4.8e-4 relative (q/k swapped in layer 1's message
# attention, B/16: margin 24; benchmarks/verification_power.py).
DEFAULT_ATOL = 2e-5
NUM_TEXTS = 3
BLOCK = 16  # pixels per side of the scene's blocks
# Amplitudes of scene, per-frame offset and noise: variances sum to ~1, like normalised images.
SCENE, OFFSET, NOISE = 0.8, 0.5, 0.3

# Oracle key for each compared output. The first three are the ones stored in tests/data/synthetic.
ORACLE_KEYS = {
    "logits": "logits",
    "video_embeds": "video_embeds_normalized",
    "text_embeds": "text_embeds_normalized",
    "prompts": "prompts",
    "text_embeds_raw": "text_embeds_raw",
    "cls_features": "cls_features",
    "mit_output": "mit_last_hidden_state",
    "img_features": "img_features",
}


@dataclass(frozen=True)
class Verification:
    """Max |Δ| between the converted model and the original, and its tolerance, per output."""

    max_abs_diff: dict[str, float]
    tolerances: dict[str, float]
    atol: float

    @property
    def ratios(self) -> dict[str, float]:
        """|Δ| / tolerance per output: a conversion passes when every ratio is <= 1."""
        return {
            name: diff / tol if tol > 0 else (math.inf if diff > 0 else 0.0)
            for name, diff in self.max_abs_diff.items()
            for tol in [self.tolerances[name]]
        }

    @property
    def margin(self) -> float:
        """The largest ratio: how many times over its tolerance the worst output is."""
        return max(self.ratios.values(), default=0.0)

    @property
    def worst(self) -> str:
        ratios = self.ratios
        return max(ratios, key=ratios.__getitem__)

    @property
    def passed(self) -> bool:
        return all(diff <= self.tolerances[name] for name, diff in self.max_abs_diff.items())

    def summary(self) -> str:
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.max_abs_diff.items())
        verdict = "OK" if self.passed else "FAILED"
        return (
            f"verification {verdict}: worst {self.worst} at {self.margin:.3g}x its tolerance "
            f"(atol {self.atol:g} x the output's max |value|); max |Δ| {diffs}"
        )


def synthetic_inputs(
    hyper: Hyper, videos: int = 1, texts: int = NUM_TEXTS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded structured clip [videos, T, 3, S, S] and token ids [texts, L] (see the module docstring).

    Row r of the ids: start token, 4 * 2**r ids, end token (the row maximum), then zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    size, frames = hyper.image_size, hyper.frames
    grid = -(-size // BLOCK)
    scene = torch.randn(videos, 1, 3, grid, grid, generator=gen)
    scene = scene.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :size, :size]
    offset = torch.randn(videos, frames, 3, 1, 1, generator=gen)
    noise = torch.randn(videos, frames, 3, size, size, generator=gen)
    pixel_values = SCENE * scene + OFFSET * offset + NOISE * noise

    input_ids = torch.zeros(texts, hyper.context_length, dtype=torch.long)
    sot, eot = hyper.vocab_size - 2, hyper.vocab_size - 1
    for row in range(texts):
        n = min(4 * 2**row, hyper.context_length - 2)
        input_ids[row, 0] = sot
        input_ids[row, 1 : n + 1] = torch.randint(1, hyper.vocab_size - 2, (n,), generator=gen)
        input_ids[row, n + 1] = eot
    return pixel_values, input_ids


@torch.no_grad()
def hf_outputs(
    model: XCLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """XCLIPModel's outputs under the names of `ORACLE_KEYS`: its own forward, intermediate results
    captured by forward hooks on the modules that produce them."""
    captured: dict[str, torch.Tensor] = {}

    def keep_output(name: str):
        return lambda module, args, output: captured.__setitem__(name, output)

    def keep_prompt_generator(module, args, output):
        captured["prompts"] = output
        captured["img_features"] = args[1]  # forward(text, visual): visual before its layernorm

    handles = [
        model.visual_projection.register_forward_hook(keep_output("cls_features")),
        model.text_projection.register_forward_hook(keep_output("text_embeds_raw")),
        model.prompts_generator.register_forward_hook(keep_prompt_generator),
    ]
    try:
        out = model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "logits": out.logits_per_video,
        "video_embeds": out.video_embeds,
        "text_embeds": out.text_embeds,
        "prompts": captured["prompts"],
        "text_embeds_raw": captured["text_embeds_raw"],
        "cls_features": captured["cls_features"].view(*pixel_values.shape[:2], -1),
        "mit_output": out.mit_output.last_hidden_state,
        "img_features": captured["img_features"],
    }


def oracle_outputs(
    original_state_dict: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, torch.Tensor]:
    out = original_forward(original_state_dict, pixel_values, input_ids, heads=heads)
    return {name: out[key] for name, key in ORACLE_KEYS.items()}


def tolerance(expected: torch.Tensor, atol: float) -> float:
    """The module's rule: `atol` times the output's largest magnitude."""
    return atol * expected.float().abs().max().item()


def compare(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], atol: float
) -> Verification:
    """Compare every output in `expected` (extra outputs in `actual` are ignored)."""
    diffs, tolerances = {}, {}
    for name, want in expected.items():
        got = actual[name]
        if got.shape != want.shape:
            raise VerificationError(f"{name}: shape {list(got.shape)} vs the original's {list(want.shape)}")
        diffs[name] = (got.float() - want.float()).abs().max().item()
        tolerances[name] = tolerance(want, atol)
    return Verification(diffs, tolerances, atol)


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


def oracle_heads(hyper: Hyper) -> OriginalHeads | None:
    """Head counts for the oracle. None: the original's own rule (width // 64, hard-coded in its code),
    NOT the config's, so a config with wrong heads is caught rather than reproduced. Only below width
    64 (small test models built with explicit heads) does the config decide."""
    if min(hyper.vision_width, hyper.text_width, hyper.embed_dim) >= HEAD_DIM:
        return None
    return OriginalHeads(hyper.vision_heads, hyper.text_heads, hyper.mit_heads, hyper.prompt_heads)
