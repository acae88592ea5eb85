"""Verification itself: its inputs, the outputs it compares, its tolerance rule, its power at full size."""

from __future__ import annotations

import zlib

import pytest
import torch

from converter.build import build_model
from converter.config import hyper_for_variant, to_config
from converter.errors import ConverterError, VerificationError
from converter.load import load_checkpoint
from converter.mutations import HARMLESS, harmless, mistakes, plant
from converter.registry import VARIANTS
from converter.rules import original_to_hf
from converter.synthetic import make_state_dict
from converter.verify import (
    DEFAULT_ATOL,
    ORACLE_KEYS,
    compare,
    hf_outputs,
    oracle_outputs,
    synthetic_inputs,
    verify,
)
from tests import helpers
from tests.helpers import SQUARE, UNEVEN, heads

# ---- inputs ------------------------------------------------------------------------------------


def test_inputs_are_deterministic():
    first, second = synthetic_inputs(UNEVEN), synthetic_inputs(UNEVEN)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(synthetic_inputs(UNEVEN, seed=1)[0], first[0])


def test_clip_has_structure_across_space_and_time():
    """A scene shared by all frames plus a per-frame change, at the scale of normalised images."""
    hyper = hyper_for_variant(VARIANTS["xclip-base-patch32"])
    pixel_values, _ = synthetic_inputs(hyper)
    assert pixel_values.shape == (1, hyper.frames, 3, hyper.image_size, hyper.image_size)
    assert 0.8 < pixel_values.std() < 1.2 and pixel_values.mean().abs() < 0.2
    frames = pixel_values[0].flatten(1)
    # Shared scene: frames correlate strongly (i.i.d. noise frames would not) ...
    correlation = torch.corrcoef(frames)
    assert correlation[~torch.eye(hyper.frames, dtype=torch.bool)].min() > 0.5
    # ... and each frame differs from the next by more than noise: its own per-channel offset.
    offsets = pixel_values[0].mean(dim=(-1, -2))  # [T, 3]
    assert (offsets[1:] - offsets[:-1]).abs().mean() > 0.2


def test_text_ids_have_different_lengths_and_end_at_the_row_maximum():
    _, input_ids = synthetic_inputs(UNEVEN)
    eot = input_ids.argmax(dim=-1)
    assert (input_ids[torch.arange(len(input_ids)), eot] == UNEVEN.vocab_size - 1).all()
    assert len(set(eot.tolist())) == len(input_ids)
    for row, end in zip(input_ids, eot.tolist(), strict=True):
        assert (row[1:end] > 0).all() and (row[end + 1 :] == 0).all()


# ---- outputs and tolerance ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven():
    original = make_state_dict(UNEVEN, seed=5)
    model = build_model(to_config(UNEVEN), original_to_hf(original))
    return original, model


def test_hf_and_oracle_return_the_same_outputs(uneven):
    original, model = uneven
    pixel_values, input_ids = synthetic_inputs(UNEVEN)
    expected = oracle_outputs(original, pixel_values, input_ids, heads(UNEVEN))
    actual = hf_outputs(model, pixel_values, input_ids)
    assert list(expected) == list(actual) == list(ORACLE_KEYS)
    assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in actual.items()}
    result = compare(expected, actual, atol=1e-4)
    assert result.passed and result.margin < 0.1, result.summary()


def test_tolerance_is_relative_to_each_outputs_scale():
    expected = {"big": torch.tensor([10.0, -20.0]), "small": torch.tensor([0.01, 0.02])}
    close = {"big": torch.tensor([10.0019, -20.0]), "small": torch.tensor([0.01, 0.0200019])}
    result = compare(expected, close, atol=1e-4)
    assert result.tolerances == pytest.approx({"big": 2e-3, "small": 2e-6})
    assert result.passed and 0.9 < result.margin < 1, result.summary()
    off = {"big": torch.tensor([10.0, -20.0]), "small": torch.tensor([0.01, 0.020003])}
    result = compare(expected, off, atol=1e-4)
    assert not result.passed and result.worst == "small" and result.margin == pytest.approx(1.5, rel=1e-2)
    assert result.summary().startswith("verification FAILED: worst small at 1.5x its tolerance")


def test_an_output_that_is_zero_must_stay_zero():
    zero = {"prompts": torch.zeros(3)}
    assert compare(zero, {"prompts": torch.zeros(3)}, 1e-4).passed
    assert not compare(zero, {"prompts": torch.tensor([0.0, 1e-9, 0.0])}, 1e-4).passed


def test_shape_mismatch_is_a_verification_error():
    with pytest.raises(VerificationError, match=r"logits: shape \[1, 2\] vs the original's \[1, 3\]"):
        compare({"logits": torch.zeros(1, 3)}, {"logits": torch.zeros(1, 2)}, 1e-4)


def test_prompts_show_a_prompt_generator_change_far_more_clearly_than_the_final_outputs(uneven):
    """Compared on their own scale, the prompts see a 1 % change of the prompt generator's alpha
    more than 5x as clearly as the three final outputs do."""
    original, model = uneven
    pixel_values, input_ids = synthetic_inputs(UNEVEN)
    expected = oracle_outputs(original, pixel_values, input_ids, heads(UNEVEN))
    with torch.no_grad():
        model.prompts_generator.alpha.mul_(1.01)
    try:
        ratios = compare(expected, hf_outputs(model, pixel_values, input_ids), 1e-4).ratios
    finally:
        with torch.no_grad():
            model.prompts_generator.alpha.div_(1.01)
    final = max(ratios["logits"], ratios["video_embeds"], ratios["text_embeds"])
    assert ratios["prompts"] > 10 and ratios["prompts"] > 5 * final, ratios


def test_layer0_message_qk_swap_is_harmless_and_layer1_is_not():
    """The HARMLESS entry's proof, checked: identical message tokens in layer 0, not in layer 1."""
    original = make_state_dict(SQUARE, seed=2)
    (planted,) = harmless(SQUARE)
    assert planted.name in HARMLESS
    result = verify(plant(planted, original, SQUARE), original, SQUARE, heads=heads(SQUARE))
    assert result.passed and result.margin < 0.01, result.summary()
    layer1 = next(m for m in mistakes(SQUARE) if m.name == "q/k swapped: message attn, layer 1")
    result = verify(plant(layer1, original, SQUARE), original, SQUARE, heads=heads(SQUARE))
    assert not result.passed, result.summary()


@pytest.mark.parametrize("case", list(helpers.CASES))
def test_default_tolerance_leaves_headroom_over_the_original_implementation(case, tmp_path):
    """The goldens' outputs, computed by the ORIGINAL X-CLIP code, against the converted model:
    every output within DEFAULT_ATOL / 10 of its scale (measured: <= 7.4e-7; `-s` prints them)."""
    from transformers import XCLIPConfig

    config = XCLIPConfig.from_pretrained(helpers.write_config(case, tmp_path).parent)
    original = {k: v.float() for k, v in load_checkpoint(helpers.checkpoint(case)).items()}
    pixel_values, input_ids = helpers.inputs(case)
    expected = helpers.expected(case)
    want = {name: torch.from_numpy(expected[key]) for name, key in ORACLE_KEYS.items()}
    result = compare(want, hf_outputs(build_model(config, original_to_hf(original)), pixel_values, input_ids),
                     DEFAULT_ATOL)  # fmt: skip
    print(case, {name: f"{ratio * DEFAULT_ATOL:.1e}" for name, ratio in result.ratios.items()})
    assert result.margin < 0.1, result.summary()


# ---- power at full size --------------------------------------------------------------------------

MIN_MARGIN = 10


@pytest.mark.slow
def test_every_planted_mistake_fails_by_a_wide_margin_on_base_patch32():
    """benchmarks/verification_power.py's table for xclip-base-patch32, as a test: every planted
    mistake is stopped by the layout check or fails verification by >= MIN_MARGIN times its
    tolerance; the correct conversion and the provably harmless mistake pass."""
    name = "xclip-base-patch32"
    hyper = hyper_for_variant(VARIANTS[name])
    original = make_state_dict(hyper, seed=zlib.crc32(name.encode()))
    pixel_values, input_ids = synthetic_inputs(hyper)
    expected = oracle_outputs(original, pixel_values, input_ids)  # once: it is the same for every mistake

    def margin(mistake) -> float | None:
        try:
            model = plant(mistake, original, hyper)
        except ConverterError:
            return None
        return compare(expected, hf_outputs(model, pixel_values, input_ids), DEFAULT_ATOL).margin

    correct = compare(expected, hf_outputs(build_model(to_config(hyper), original_to_hf(original)),
                                           pixel_values, input_ids), DEFAULT_ATOL)  # fmt: skip
    assert correct.passed, correct.summary()
    for mistake in harmless(hyper):
        assert margin(mistake) < 1, mistake.name
    margins = {m.name: margin(m) for m in mistakes(hyper)}
    weak = {k: v for k, v in margins.items() if v is not None and v < MIN_MARGIN}
    assert not weak, f"verification too weak (margin < {MIN_MARGIN}): {weak}"
    assert sum(v is None for v in margins.values()) <= 4, margins  # the shape-changing ones only
