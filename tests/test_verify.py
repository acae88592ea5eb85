"""Verification itself: its inputs, the outputs it compares, its tolerance rule, its power at full size."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import pytest
import torch

from converter.build import build_model
from converter.config import hyper_for_variant, to_config
from converter.errors import ConverterError, VerificationError
from converter.load import load_checkpoint
from converter.oracle import (
    CROSS_ATTENTION,
    MESSAGE_ATTENTION,
    MESSAGE_FC,
    MESSAGE_LN,
    MESSAGE_TOKEN,
    OUTPUT,
    PROMPT,
    SELF_ATTENTION,
    layer_site,
    original_sites,
)
from converter.registry import VARIANTS
from converter.rules import original_to_hf
from converter.synthetic import make_state_dict
from converter.verify import (
    DEFAULT_ATOL,
    NOT_COMPARED,
    ORACLE_KEYS,
    check_token_table,
    compare_sites,
    read_sites,
    synthetic_inputs,
    verify,
)
from tests import helpers
from tests.helpers import OUTPUTS, SQUARE, UNEVEN, compare, heads, hf_outputs, oracle_outputs, run
from tests.mutations import HARMLESS, harmless, mistakes, plant, proof

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


@pytest.mark.parametrize("context_length", [2, 5, 10])
def test_text_ids_fit_a_short_context(context_length):
    """A config may give any context of at least 2 tokens: each text is cut to fit between its start
    and end tokens, so verification runs rather than failing to build its inputs."""
    hyper = dataclasses.replace(UNEVEN, context_length=context_length)
    _, input_ids = synthetic_inputs(hyper)
    assert input_ids.shape == (3, context_length)
    assert (input_ids[:, 0] == hyper.vocab_size - 2).all()
    ends = input_ids.argmax(dim=-1)
    assert (input_ids[torch.arange(3), ends] == hyper.vocab_size - 1).all()
    assert ends.max() == context_length - 1


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


def test_a_zero_output_that_moves_is_reported_as_infinitely_over_its_tolerance():
    """A zero tolerance leaves no finite ratio: the failing site must not read as 0x its tolerance,
    nor the summary as 'every site identical'."""
    zero = {"prompts": torch.zeros(3)}
    result = compare(zero, {"prompts": torch.tensor([0.0, 1e-9, 0.0])}, 1e-4)
    assert result.margin == float("inf") and result.ratios == {"prompts": float("inf")}
    assert result.summary().startswith("verification FAILED: worst prompts at infx its tolerance, "), result
    assert compare(zero, zero, 1e-4).margin == 0.0


def test_shape_mismatch_is_a_verification_error():
    with pytest.raises(VerificationError, match=r"logits: shape \[1, 2\] vs the original's \[1, 3\]"):
        compare({"logits": torch.zeros(1, 3)}, {"logits": torch.zeros(1, 2)}, 1e-4)


def test_the_tolerance_asked_for_is_the_one_applied(uneven):
    """--atol reaches every site: ten times the tolerance, ten times each site's allowance."""
    original, model = uneven
    default = verify(model, original, UNEVEN, heads=heads(UNEVEN))
    looser = verify(model, original, UNEVEN, atol=10 * DEFAULT_ATOL, heads=heads(UNEVEN))
    assert looser.atol == 10 * DEFAULT_ATOL and f"atol {10 * DEFAULT_ATOL:g} x" in looser.summary()
    for site, base in zip(looser.sites, default.sites, strict=True):
        assert site.tolerance == pytest.approx(10 * base.tolerance), site.name
    # The summary counts every compared site, not the outputs alone.
    assert len(looser.sites) > len(looser.max_abs_diff)
    assert f"({len(looser.sites)} sites compared, " in looser.summary()


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
    planted = next(m for m in harmless(SQUARE) if m.name == "q/k swapped: message attn, layer 0")
    assert planted.name in HARMLESS
    result = verify(plant(planted, original, SQUARE), original, SQUARE, heads=heads(SQUARE))
    assert result.passed and result.margin < 0.01, result.summary()
    layer1 = next(m for m in mistakes(SQUARE) if m.name == "q/k swapped: message attn, layer 1")
    result = verify(plant(layer1, original, SQUARE), original, SQUARE, heads=heads(SQUARE))
    assert not result.passed, result.summary()


@pytest.mark.parametrize("case", list(helpers.CASES))
def test_default_tolerance_leaves_headroom_over_the_original_implementation(case, tmp_path):
    """The goldens' outputs, computed by the ORIGINAL X-CLIP code, against the converted model:
    every output within DEFAULT_ATOL / 10 of its scale (measured: <= 3e-7; `-s` prints them)."""
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


# ---- every site, in forward order ------------------------------------------------------------------


def _names(sites) -> list[str]:
    return [name for name, _ in sites]


def test_both_sides_read_the_same_sites_in_the_same_order(uneven):
    """Every block of every stack (its attention and its output), the message token's four steps in
    each vision block, the outputs; the HF side's sites read in the order the oracle yields them."""
    original, model = uneven
    pixel_values, input_ids = synthetic_inputs(UNEVEN)
    oracle = [k for k in _names(original_sites(original, pixel_values, input_ids, heads(UNEVEN)))]
    hf: list[str] = []
    read_sites(model, pixel_values, input_ids, lambda name, tensor: hf.append(ORACLE_KEYS.get(name, name)))
    assert hf == [k for k in oracle if k not in NOT_COMPARED]
    assert NOT_COMPARED < set(OUTPUTS) and set(ORACLE_KEYS.values()) < set(hf)
    # Six sites per vision block, two per text, MIT and prompt-generator block.
    blocks = UNEVEN.vision_layers * 6 + 2 * (UNEVEN.text_layers + UNEVEN.mit_layers + UNEVEN.prompt_layers)
    assert len(hf) == blocks + 2 + 2 + len(ORACLE_KEYS)  # + embeddings, the two LayerNorms, the outputs
    block4 = [name.removeprefix("vision layer 4, ") for name in hf if name.startswith("vision layer 4, ")]
    assert block4 == [MESSAGE_FC, MESSAGE_LN, MESSAGE_ATTENTION, MESSAGE_TOKEN, SELF_ATTENTION, OUTPUT]
    assert [n for n in hf if n.startswith("prompt generator layer 1")] == [
        layer_site(PROMPT, 1, CROSS_ATTENTION),
        layer_site(PROMPT, 1),
    ]
    result = verify(model, original, UNEVEN, heads=heads(UNEVEN))
    assert result.passed and len(result.compared) == len(hf) and result.margin < 0.1, result.summary()
    assert [site.name for site in result.compared] == [
        next((n for n, k in ORACLE_KEYS.items() if k == key), key) for key in hf
    ]


def test_the_oracle_runs_in_step_with_the_model(uneven):
    """Each oracle site is computed only when the model reaches it: a mismatch at the second site
    stops verification before the oracle is asked for a third (so no more than the current sites
    are ever held)."""
    original, model = uneven
    pixel_values, input_ids = synthetic_inputs(UNEVEN)
    real = original_sites(original, pixel_values, input_ids, heads(UNEVEN))
    first = next(real)
    asked: list[str] = []

    def oracle():
        yield first
        asked.append("second")
        yield "not a site", first[1]
        asked.append("third")
        raise AssertionError("the oracle was asked for a site the model has not reached")

    with pytest.raises(VerificationError, match="where the original computes not a site"):
        compare_sites(model, oracle(), pixel_values, input_ids, DEFAULT_ATOL)
    assert asked == ["second"]


def test_a_model_with_fewer_layers_is_named(uneven):
    original, _ = uneven
    last = f"text_model.encoder.layers.{UNEVEN.text_layers - 1}."
    converted = {k: v for k, v in original_to_hf(original).items() if not k.startswith(last)}
    model = build_model(to_config(dataclasses.replace(UNEVEN, text_layers=UNEVEN.text_layers - 1)), converted)
    message = "computes text_last_hidden_state where the original computes text layer 11, self-attention"
    with pytest.raises(VerificationError, match=message):
        verify(model, original, UNEVEN, heads=heads(UNEVEN))


def test_the_first_divergence_is_the_first_in_forward_order_not_the_worst():
    expected = {"early": torch.tensor([1.0, 2.0]), "late": torch.tensor([1.0, 2.0])}
    actual = {"early": torch.tensor([1.0, 2.001]), "late": torch.tensor([1.0, 2.5])}
    result = compare(expected, actual, atol=1e-4)
    assert result.worst == "late" and result.first_divergence.name == "early"
    assert result.first_divergence.ratio == pytest.approx(5, rel=1e-3)
    assert "first divergence: early at 5x its tolerance" in result.summary()
    message = str(VerificationError("the converted model does not reproduce the original", result))
    assert message.endswith("; first divergence: early at 5x its tolerance")
    assert compare(expected, expected, 1e-4).first_divergence is None
    assert "first divergence" not in str(VerificationError("x", compare(expected, expected, 1e-4)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_value_that_is_not_finite_fails_the_site(bad):
    """NaN passes no comparison: `NaN > tolerance` is False, so it must not be what decides a site."""
    expected = {"early": torch.tensor([1.0, 2.0]), "late": torch.tensor([1.0, 2.0])}
    result = compare(expected, {"early": torch.tensor([1.0, bad]), "late": expected["late"]}, atol=1e-4)
    assert not result.passed and result.first_divergence.name == "early"
    assert result.margin == float("inf") and "verification FAILED" in result.summary()
    inf_expected = {"early": torch.tensor([1.0, float("inf")])}  # an original overflowing: no pass either
    assert not compare(inf_expected, {"early": torch.tensor([1.0, 3.0])}, atol=1e-4).passed


def test_a_logit_scale_stored_as_its_exponential_fails_at_the_logits(uneven):
    """exp(logit_scale) written where its log belongs: the logits overflow, and +inf - inf is NaN."""
    original, _ = uneven
    converted = original_to_hf(original)
    converted["logit_scale"] = converted["logit_scale"].exp()
    result = verify(build_model(to_config(UNEVEN), converted), original, UNEVEN, heads=heads(UNEVEN))
    assert not result.passed and result.first_divergence.name == "logits", result.summary()


def _rows_the_inputs_do_not_use(hyper) -> list[int]:
    used = set(synthetic_inputs(hyper)[1].flatten().tolist())
    return [row for row in range(hyper.vocab_size) if row not in used]


def test_token_embedding_rows_the_inputs_never_look_up_are_compared(uneven):
    """Rows of ids the verification's texts do not use pass every site; the table check names them."""
    original, model = uneven
    check_token_table(model, original, DEFAULT_ATOL)  # the correct conversion
    unused = _rows_the_inputs_do_not_use(UNEVEN)
    converted = original_to_hf(original)
    table = converted["text_model.embeddings.token_embedding.weight"].clone()
    table[unused] = table[unused].roll(1, dims=0)  # off by one among the unused ids only
    converted["text_model.embeddings.token_embedding.weight"] = table
    shifted = build_model(to_config(UNEVEN), converted)
    assert verify(shifted, original, UNEVEN, heads=heads(UNEVEN)).passed  # the sites cannot see it
    with pytest.raises(VerificationError, match=f"differ from the original's in {len(unused)} of "):
        check_token_table(shifted, original, DEFAULT_ATOL)


def test_a_conversion_with_shifted_token_rows_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from converter import pipeline
    from converter.config import hyper_from_config, load_config_file

    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    unused = _rows_the_inputs_do_not_use(hyper_from_config(load_config_file(config)))
    to_hf = pipeline.original_to_hf

    def shifting_unused_rows(original):
        converted = to_hf(original)
        table = converted["text_model.embeddings.token_embedding.weight"].clone()
        table[unused] = table[unused].roll(1, dims=0)
        return {**converted, "text_model.embeddings.token_embedding.weight": table}

    monkeypatch.setattr(pipeline, "original_to_hf", shifting_unused_rows)
    assert (
        run("--checkpoint", helpers.checkpoint("tiny-a"), "--config", config, "--output", tmp_path / "out")
        == 1
    )
    assert "token embeddings differ from the original's" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- the catalogue: each mistake fails where it enters, each harmless twin passes -------------------

SMALL = {"uneven": UNEVEN, "square": SQUARE}
CATALOGUE = [
    pytest.param(case, m.name, id=f"{case}: {m.name}")
    for case, hyper in SMALL.items()
    for m in mistakes(hyper) + harmless(hyper)
]


@functools.cache
def _small(case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list]:
    """The small model's original weights, the verification inputs and the oracle's sites (computed once)."""
    hyper = SMALL[case]
    original = make_state_dict(hyper, seed=7)
    pixel_values, input_ids = synthetic_inputs(hyper)
    return (
        original,
        pixel_values,
        input_ids,
        list(original_sites(original, pixel_values, input_ids, heads(hyper))),
    )


@pytest.mark.parametrize(("case", "name"), CATALOGUE)
def test_every_mistake_is_named_where_it_enters(case, name):
    """A planted mistake fails verification and its first divergent site is the one where it was
    planted (or the first that consumes it); a harmless twin passes (its proof in HARMLESS)."""
    hyper = SMALL[case]
    original, pixel_values, input_ids, sites = _small(case)
    twins = {m.name: m for m in harmless(hyper)}
    mistake = twins.get(name) or next(m for m in mistakes(hyper) if m.name == name)
    try:
        model = plant(mistake, original, hyper)
    except ConverterError as err:
        assert mistake.site == "layout", err
        return
    assert mistake.site != "layout", f"{name}: expected the layout check to stop it"
    result = compare_sites(model, sites, pixel_values, input_ids, DEFAULT_ATOL)
    if name in twins:
        assert proof(mistake) and result.passed, result.summary()
        assert mistake.site in [site.name for site in result.compared]
    else:
        assert not result.passed, result.summary()
        assert result.first_divergence.name == mistake.site, result.summary()


def test_a_broken_mapping_is_named_by_the_cli_the_audit_and_the_way_back(tmp_path, monkeypatch, capsys):
    """One rule row wrong (the q/k halves of one message attention's bias): the conversion exits 1
    and names the site on stdout and in its error line; the audit of a folder converted that way
    and the way back name it too."""
    import converter.pipeline
    import converter.rules
    from converter.rules import hf_to_original

    mistake = next(m for m in mistakes(UNEVEN) if m.name == "q/k bias swapped: message attn, mid layer")
    site = "first divergence: vision layer 5, message attention (across frames) at"
    assert mistake.site in site
    checkpoint, config = tmp_path / "ckpt.pth", tmp_path / "config"
    original = make_state_dict(UNEVEN, seed=3)
    torch.save({"model": original}, checkpoint)
    to_config(UNEVEN).save_pretrained(config)
    config = config / "config.json"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "right", "-q") == 0
    capsys.readouterr()

    monkeypatch.setattr(converter.pipeline, "original_to_hf", lambda sd: original_to_hf(sd, mistake.rules))
    assert run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out", "-q") == 1
    out, err = capsys.readouterr()
    assert site in out and "verification FAILED" in out
    assert site in err and "nothing was written" in err and not (tmp_path / "out").exists()

    wrong = tmp_path / "wrong"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", wrong, "--no-verify", "-q") == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert run("--audit", wrong, "--checkpoint", checkpoint, "--config", config, "-q") == 1
    out, _ = capsys.readouterr()
    assert "FAIL outputs       first divergence: vision layer 5, message attention (across frames) at" in out

    monkeypatch.setattr(converter.rules, "hf_to_original", lambda sd: hf_to_original(sd, mistake.rules))
    assert run("--to-original", tmp_path / "right", "--output", tmp_path / "back.pth", "-q") == 1
    _, err = capsys.readouterr()
    assert site in err and not (tmp_path / "back.pth").exists()


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
    # Once: the oracle's sites are the same for every mistake.
    expected = list(original_sites(original, pixel_values, input_ids))

    def margin(mistake) -> float | None:
        try:
            model = plant(mistake, original, hyper)
        except ConverterError:
            return None
        return compare_sites(model, expected, pixel_values, input_ids, DEFAULT_ATOL).margin

    correct_model = build_model(to_config(hyper), original_to_hf(original))
    correct = compare_sites(correct_model, expected, pixel_values, input_ids, DEFAULT_ATOL)
    assert correct.passed, correct.summary()
    for mistake in harmless(hyper):
        assert margin(mistake) < 1, mistake.name
    margins = {m.name: margin(m) for m in mistakes(hyper)}
    weak = {k: v for k, v in margins.items() if v is not None and v < MIN_MARGIN}
    assert not weak, f"verification too weak (margin < {MIN_MARGIN}): {weak}"
    assert sum(v is None for v in margins.values()) <= 4, margins  # the shape-changing ones only
