"""Plausible conversion mistakes, planted in the rule table or the config, that verification must catch.

Each mistake is a modified copy of `converter.rules.RULES` (a rule for one concrete layer put in
front of the general one, which `original_to_hf` matches first) and/or a modified `Hyper` for the
config. Used by tests/test_verify.py and benchmarks/verification_power.py to measure by how much
verification fails for each one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter.config import Hyper, to_config
from converter.rules import RENAME, RULES, TRANSPOSE, Op, Rule, check_state_dict, original_to_hf

if TYPE_CHECKING:
    from transformers import XCLIPModel

Rules = tuple[Rule, ...]

VISION = "visual.transformer.resblocks.{i}."
TEXT = "transformer.resblocks.{i}."
MIT = "mit.resblocks.{i}."
PROMPT = "prompts_generator.decoder.{i}."
# The packed attentions (in_proj rows q, k, v) and their stacks.
PACKED = {
    "vision attn": VISION + "attn",
    "message attn": VISION + "message_attn",
    "text attn": TEXT + "attn",
    "MIT attn": MIT + "attn",
}


@dataclass(frozen=True)
class Mistake:
    name: str
    rules: Rules = RULES
    hyper: Hyper | None = None  # the config's hyper-parameters when the mistake is in the config


# Provably harmless, with the proof: not planted by `mistakes`.
HARMLESS = {
    "q/k swapped: message attn, layer 0": (
        "in layer 0 every frame's message token is message_fc of the class token after ln_pre, which "
        "does not depend on the pixels: the T tokens attended over are identical, so every score in a "
        "row is equal, softmax is uniform whatever q and k are, and the output is the shared v"
    ),
}


def _rule(original: str) -> Rule:
    return next(r for r in RULES if r.original == original)


def _copy(rule: Rule, src: int | None = None, dst: int | None = None, **changes) -> Rule:
    """`rule` with other fields; with `src`, for original layer `src` only, landing at HF layer `dst`."""
    if src is not None:
        changes["original"] = rule.original.replace("{i}", str(src))
        changes["hf"] = tuple(h.replace("{i}", str(dst)) for h in changes.get("hf", rule.hf))
    return dataclasses.replace(rule, **changes)


def _swap_packed(module: str, layer: int, a: int, b: int) -> Rules:
    """Rows a and b of in_proj (weight and bias) go to each other's projection in one layer."""
    planted = []
    for param in ("weight", "bias"):
        rule = _rule(f"{module}.in_proj_{param}")
        hf = list(rule.hf)
        hf[a], hf[b] = hf[b], hf[a]
        planted.append(_copy(rule, layer, layer, hf=tuple(hf)))
    return (*planted, *RULES)


def _swap_keys(layer: int | None, *pairs: tuple[str, str]) -> Rules:
    """Each pair's first key goes where its second belongs and back, in one layer (or every layer
    when None)."""
    target = {x: _rule(y).hf for a, b in pairs for x, y in ((a, b), (b, a))}
    if layer is not None:
        return (*(_copy(_rule(x), layer, layer, hf=hf) for x, hf in target.items()), *RULES)
    return tuple(_copy(r, hf=target[r.original]) if r.original in target else r for r in RULES)


def _swap_layers(prefix: str, layer: int) -> Rules:
    """Off by one: original blocks `layer` and `layer + 1` of a stack land in each other's place."""
    planted = [
        _copy(rule, src, dst)
        for rule in RULES
        if rule.original.startswith(prefix)
        for src, dst in ((layer, layer + 1), (layer + 1, layer))
    ]
    return (*planted, *RULES)


def _shift_layers(prefix: str, layers: int) -> Rules:
    """Off by one with no second layer to swap with: block i lands at i + 1 (the layout check's case)."""
    planted = [_copy(r, i, i + 1) for r in RULES if r.original.startswith(prefix) for i in range(layers)]
    return (*planted, *RULES)


def _with_op(original: str, op: Op) -> Rules:
    return tuple(_copy(r, op=op) if r.original == original else r for r in RULES)


def harmless(hyper: Hyper) -> list[Mistake]:
    """The `HARMLESS` mistakes, planted: verification must pass them (|Δ| at rounding level)."""
    return [Mistake("q/k swapped: message attn, layer 0", _swap_packed(PACKED["message attn"], 0, 0, 1))]


def _wrong_heads(right: int) -> int:
    """12 -> 8 (the old port's L/14 MIT/prompt mistake), otherwise half."""
    return 8 if right == 12 else right // 2


def mistakes(hyper: Hyper) -> list[Mistake]:
    """Every planted mistake for `hyper`'s layer counts, in a middle layer where there is a choice."""
    mid = {
        "vision attn": hyper.vision_layers // 2,
        "message attn": hyper.vision_layers // 2,
        "text attn": hyper.text_layers // 2,
        "MIT attn": hyper.mit_layers // 2,
    }
    planted: list[Mistake] = []
    for family, module in PACKED.items():
        layer = mid[family]
        planted.append(Mistake(f"q/k swapped: {family}, layer {layer}", _swap_packed(module, layer, 0, 1)))
        if family == "message attn" and layer != 1:
            # Layer 1 is the first in which the message tokens differ between frames.
            planted.append(Mistake(f"q/k swapped: {family}, layer 1", _swap_packed(module, 1, 0, 1)))
        planted.append(Mistake(f"k/v swapped: {family}, layer {layer}", _swap_packed(module, layer, 1, 2)))
    layer = hyper.prompt_layers // 2
    for a, b in (("q", "k"), ("k", "v")):
        planted.append(
            Mistake(
                f"{a}/{b} swapped: prompt cross-attn, layer {layer}",
                _swap_keys(
                    layer, (f"{PROMPT}cross_attn.{a}_proj.weight", f"{PROMPT}cross_attn.{b}_proj.weight")
                ),
            )
        )

    for field, family in (
        ("vision_heads", "vision + message"),
        ("text_heads", "text"),
        ("mit_heads", "MIT"),
        ("prompt_heads", "prompt cross-attn"),
    ):
        right = getattr(hyper, field)
        wrong = _wrong_heads(right)
        changed = dataclasses.replace(hyper, **{field: wrong})
        planted.append(Mistake(f"heads {wrong} instead of {right}: {family}", hyper=changed))

    planted += [
        Mistake(
            "norm1/norm3 swapped: prompt layers",
            _swap_keys(None, *((f"{PROMPT}norm1.{p}", f"{PROMPT}norm3.{p}") for p in ("weight", "bias"))),
        ),
        Mistake("missing transpose: visual.proj", _with_op("visual.proj", RENAME)),
        Mistake("missing transpose: text_projection", _with_op("text_projection", RENAME)),
        Mistake("transposed prompts_visual_proj", _with_op("prompts_visual_proj", TRANSPOSE)),
        Mistake(
            "visual.proj / text_projection swapped", _swap_keys(None, ("visual.proj", "text_projection"))
        ),
    ]
    for stack, prefix, layers in (
        ("vision", VISION, hyper.vision_layers),
        ("text", TEXT, hyper.text_layers),
        ("MIT", MIT, hyper.mit_layers),
        ("prompt", PROMPT, hyper.prompt_layers),
    ):
        if layers > 1:
            m = (layers - 1) // 2
            planted.append(
                Mistake(f"off by one: {stack} blocks {m} and {m + 1} swapped", _swap_layers(prefix, m))
            )
        else:
            planted.append(Mistake(f"off by one: {stack} block i -> i + 1", _shift_layers(prefix, layers)))
    return planted


def plant(mistake: Mistake, original: Mapping[str, torch.Tensor], hyper: Hyper) -> XCLIPModel:
    """Convert `original` with the mistake and build the model, as the pipeline would.

    Raises ConverterError when the layout check (keys and shapes against the config) catches it first.
    """
    from converter.build import build_model

    config_hyper = mistake.hyper or hyper
    converted = original_to_hf(original, mistake.rules)
    check_state_dict(converted, config_hyper)
    return build_model(to_config(config_hyper), converted)
