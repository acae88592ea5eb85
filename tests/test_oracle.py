"""The independent original X-CLIP forward (the project's oracle) against the original's goldens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.oracle import OriginalHeads, causal_mask
from tests import helpers
from tests.helpers import original_forward

SD = dict[str, torch.Tensor]
TOLERANCE = 1e-5
CASES = ["tiny-a", "tiny-a-fp16", "tiny-b"]


def _load(case: str) -> tuple[SD, SD, OriginalHeads]:
    """State dict, inputs and the explicit head counts of one golden (widths < 64 there)."""
    state_dict = torch.load(helpers.checkpoint(case), weights_only=True, map_location="cpu")["model"]
    pixel_values, input_ids = helpers.inputs(case)
    return state_dict, {"pixel_values": pixel_values, "input_ids": input_ids}, helpers.golden_heads(case)


def _logits(state_dict: SD, inputs: SD, heads: OriginalHeads) -> torch.Tensor:
    return original_forward(state_dict, inputs["pixel_values"], inputs["input_ids"], heads)["logits"]


@pytest.mark.parametrize("case", CASES)
def test_reproduces_every_golden_array(case, record_property):
    state_dict, inputs, heads = _load(case)
    out = original_forward(state_dict, inputs["pixel_values"], inputs["input_ids"], heads)
    golden = helpers.expected(case)
    assert set(out) == set(golden)
    deltas = {}
    for key, want in golden.items():
        got = out[key].numpy()
        assert got.shape == want.shape, key
        assert got.dtype == np.float32, key
        deltas[key] = float(np.abs(got - want).max())
    record_property("max_abs_delta", deltas)
    print(f"{case}: " + ", ".join(f"{k}={v:.1e}" for k, v in deltas.items()))
    assert max(deltas.values()) <= TOLERANCE, {k: v for k, v in deltas.items() if v > TOLERANCE}


def _swap_rows(state_dict: SD, key: str, first: slice, second: slice) -> SD:
    """A copy of the state dict with two row blocks of one tensor exchanged."""
    tensor = state_dict[key].clone()
    tensor[first], tensor[second] = state_dict[key][second], state_dict[key][first]
    return {**state_dict, key: tensor}


@pytest.mark.parametrize(
    "key",
    [
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.1.message_attn.in_proj_weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "mit.resblocks.0.attn.in_proj_weight",
    ],
)
def test_swapping_q_and_k_moves_logits(key):
    """The comparison can fail: exchanging the q and k rows of one packed in_proj is seen."""
    state_dict, inputs, heads = _load("tiny-a")
    d = state_dict[key].shape[1]
    perturbed = _swap_rows(state_dict, key, slice(0, d), slice(d, 2 * d))
    delta = (_logits(perturbed, inputs, heads) - _logits(state_dict, inputs, heads)).abs().max().item()
    assert delta > 1e-4, delta


def test_wrong_head_count_moves_logits():
    state_dict, inputs, heads = _load("tiny-a")
    wrong = OriginalHeads(heads.vision, heads.text, heads.mit, heads.prompts * 2)
    delta = (_logits(state_dict, inputs, wrong) - _logits(state_dict, inputs, heads)).abs().max().item()
    assert delta > 1e-4, delta


def _shapes_only(vision_width: int, text_width: int, embed_dim: int) -> SD:
    """The two keys that fix every width, on the meta device (no memory)."""
    return {
        "visual.conv1.weight": torch.empty(vision_width, 3, 16, 16, device="meta"),
        "text_projection": torch.empty(text_width, embed_dim, device="meta"),
    }


@pytest.mark.parametrize(
    ("widths", "want"),
    [
        ((768, 512, 512), OriginalHeads(12, 8, 8, 8)),  # ViT-B
        ((1024, 768, 768), OriginalHeads(16, 12, 12, 12)),  # ViT-L: 12 MIT/prompt heads, not 8
        ((192, 128, 256), OriginalHeads(3, 2, 4, 4)),
    ],
)
def test_heads_from_state_dict_are_width_over_64(widths, want):
    assert OriginalHeads.from_state_dict(_shapes_only(*widths)) == want


def test_widths_below_64_need_explicit_heads():
    state_dict, inputs, _ = _load("tiny-a")
    with pytest.raises(ValueError, match="heads"):
        original_forward(state_dict, inputs["pixel_values"], inputs["input_ids"])


def test_causal_mask():
    mask = causal_mask(4)
    assert mask.shape == (4, 4)
    assert torch.isneginf(mask).equal(torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert (mask.tril() == 0).all()
