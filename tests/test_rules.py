"""The rule table: round trip, strict accounting, and deliberate mistakes that verification must catch."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

from converter import rules as R
from converter.build import build_model
from converter.config import Hyper, to_config
from converter.errors import ConverterError
from converter.oracle import OriginalHeads
from converter.rules import check_state_dict
from converter.synthetic import make_state_dict
from converter.verify import verify
from tests.helpers import SQUARE, UNEVEN, heads
from tests.mutations import mistakes, plant


@pytest.fixture(scope="module", params=[UNEVEN, SQUARE], ids=["uneven", "square"])
def case(request):
    return request.param, make_state_dict(request.param, seed=7)


def convert_and_verify(hyper: Hyper, original, rules=R.RULES):
    converted = R.original_to_hf(original, rules)
    config = to_config(hyper)
    check_state_dict(converted, hyper)
    return verify(build_model(config, converted), original, hyper, heads=heads(hyper))


def test_correct_table_verifies(case):
    hyper, original = case
    result = convert_and_verify(hyper, original)
    assert result.passed, result.summary()


def test_round_trip_is_bitwise(case):
    _, original = case
    restored = R.hf_to_original(R.original_to_hf(original))
    assert restored.keys() == original.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key


def test_every_rule_is_used_by_a_real_layout(case):
    _, original = case
    used = {n for key in original if (m := R._match(R.RULES, key, "original")) for n in [m[0]]}
    assert used == set(range(len(R.RULES)))


# ---- deliberate mistakes (tests/mutations.py: the catalogue the full-size power benchmark plants) ----

CASES = {"uneven": UNEVEN, "square": SQUARE}
# The ~100 same-shape pair swaps (named "a ↔ b") are left to tests/test_verify.py, which checks every
# mistake of the catalogue more strictly (it fails, at the site where it was planted).
PLANTED = [
    pytest.param(case, m.name, id=f"{case}: {m.name}")
    for case, h in CASES.items()
    for m in mistakes(h)
    if "↔" not in m.name
]


@functools.cache
def original_for(case: str) -> dict[str, torch.Tensor]:
    return make_state_dict(CASES[case], seed=7)


def verify_mistake(case: str, name: str):
    hyper, original = CASES[case], original_for(case)
    mistake = next(m for m in mistakes(hyper) if m.name == name)
    return verify(plant(mistake, original, hyper), original, hyper, heads=heads(hyper))


@pytest.mark.parametrize(("case", "name"), PLANTED)
def test_deliberate_mistake_is_caught(case, name):
    """Caught either by the layout check (ConverterError naming the keys) or by verification."""
    try:
        result = verify_mistake(case, name)
    except ConverterError as err:
        assert "shape mismatches" in str(err) or "not produced" in str(err), err
        return
    assert not result.passed, f"{name} went unnoticed: {result.summary()}"


def test_square_layout_catches_transposes_numerically():
    """On the square layout the transposes keep their shapes: verification must do the catching."""
    for name in ("missing transpose: visual.proj", "missing transpose: text_projection",
                 "transposed prompts_visual_proj", "visual.proj / text_projection swapped"):  # fmt: skip
        result = verify_mistake("square", name)
        assert result.margin > 10, f"{name}: {result.summary()}"


def test_wrong_head_count_is_caught():
    """The old converter's L/14 mistake: 8 MIT/prompt heads where the original has E // 64 = 12."""
    hyper = dataclasses.replace(
        SQUARE, embed_dim=768, text_width=64, mit_heads=12, mit_mlp=3072, prompt_heads=12
    )
    original = make_state_dict(hyper, seed=3)
    config = to_config(dataclasses.replace(hyper, mit_heads=8, prompt_heads=8))
    model = build_model(config, R.original_to_hf(original))
    result = verify(model, original, hyper, heads=OriginalHeads(vision=4, text=4, mit=12, prompts=12))
    assert not result.passed, result.summary()


# ---- strict accounting -------------------------------------------------------------------------


def test_every_problem_is_listed_in_one_error():
    original = make_state_dict(UNEVEN, seed=1)
    original["visual.surprise"] = torch.zeros(2)
    with pytest.raises(ConverterError) as err:
        R.original_to_hf(original)
    assert "visual.surprise [2]" in str(err.value)

    del original["visual.surprise"]
    converted = R.original_to_hf(original)
    converted.pop("mit.position_embedding")
    converted.pop("text_model.final_layer_norm.bias")
    converted["visual_projection.weight"] = torch.zeros(5, 5)
    converted["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConverterError) as err:
        check_state_dict(converted, UNEVEN)
    message = str(err.value)
    for expected in (
        "extra.weight [1]",
        "mit.position_embedding [1, 3, 48]",
        "text_model.final_layer_norm.bias [64]",
        "visual_projection.weight: checkpoint gives [5, 5], config expects [48, 96]",
    ):
        assert expected in message


def test_reverse_direction_reports_incomplete_qkv():
    converted = R.original_to_hf(make_state_dict(SQUARE, seed=1))
    del converted["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ConverterError, match=r"text_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight"):
        R.hf_to_original(converted)


def test_packed_weight_that_does_not_split_is_reported():
    original = make_state_dict(SQUARE, seed=1)
    original["mit.resblocks.0.attn.in_proj_bias"] = torch.zeros(100)
    with pytest.raises(ConverterError, match=r"mit\.resblocks\.0\.attn\.in_proj_bias \[100\]"):
        R.original_to_hf(original)


@pytest.mark.parametrize(
    ("direction", "key"),
    [
        (R.original_to_hf, "visual.proj_old"),  # would overwrite visual_projection.weight
        (R.original_to_hf, "transformer.resblocks.1.ln_1.bias_ema"),
        (R.hf_to_original, "logit_scale_init"),  # would overwrite logit_scale
    ],
)
def test_a_key_that_only_starts_like_a_rule_is_not_consumed(direction, key):
    """A pattern matches the whole key: one that merely begins like a rule's key must be listed, not
    converted as that rule's tensor (where it would silently replace the real one)."""
    state_dict = make_state_dict(SQUARE, seed=1)
    if direction is R.hf_to_original:
        state_dict = R.original_to_hf(state_dict)
    with pytest.raises(ConverterError, match=re.escape(f"{key} [2]")):
        direction({**state_dict, key: torch.zeros(2)})


def test_listed_keys_are_sorted_so_the_first_twenty_do_not_depend_on_the_files_order():
    original = make_state_dict(SQUARE, seed=1)
    surprises = {f"surprise.{n:02d}": torch.zeros(1) for n in reversed(range(25))}
    with pytest.raises(ConverterError) as err:
        R.original_to_hf({**original, **surprises})
    lines = str(err.value).splitlines()
    assert lines[1:3] == ["  25 source keys no rule consumes:", "    surprise.00 [1]"]
    assert lines[-2:] == ["    surprise.19 [1]", "    ... and 5 more"]


def test_listed_keeps_twenty_items_whole_and_shortens_more() -> None:
    from converter.errors import listed

    twenty = [f"k{i}" for i in range(20)]
    assert listed(twenty) == twenty
    assert listed([*twenty, "k20", "k21"]) == [*twenty, "... and 2 more"]


def test_reason_is_one_line_of_at_most_300_characters() -> None:
    from converter.errors import reason

    assert reason(ValueError("x" * 299 + "\nsecond line")) == "x" * 299
    assert reason(ValueError("y" * 1000)) == "y" * 300
    assert reason(ValueError("")) == "ValueError"
