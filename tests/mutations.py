"""Plausible conversion mistakes, planted in the rule table or the config, that verification must catch,
and their harmless twins, which it must pass.

Each mistake is a modified copy of `converter.rules.RULES` (a rule for one concrete layer put in
front of the general one, which `original_to_hf` matches first) and/or a modified `Hyper` for the
config, with the site where it must show first: where it was planted, or the first site that
consumes what it changed (`converter.oracle` names the sites). Used by tests/test_verify.py,
tests/test_rules.py and benchmarks/verification_power.py.

The families: q/k and k/v swapped in each attention (weights and bias together, and the bias alone),
wrong head counts, swapped norms, missing or extra transposes, off-by-one layers, and every pair of
same-shape tensors of one middle block exchanged (which includes `message_fc.bias` ↔
`message_attn.out_proj.bias`). The prompt generator's cross-attention has bias-free q/k/v
projections, so it has no bias halves to swap; its bias-only mistakes are the pairs around its `proj`
bias (with `mlp.3.bias` and the norms' biases).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter import rules
from converter.config import Hyper, to_config
from converter.oracle import (
    CROSS_ATTENTION,
    MESSAGE_ATTENTION,
    MESSAGE_FC,
    MESSAGE_LN,
    MIT,
    OUTPUT,
    PROMPT,
    SELF_ATTENTION,
    TEXT,
    VISION,
    layer_site,
)
from converter.rules import CHUNK_QKV, RENAME, RULES, TRANSPOSE, Op, Rule, check_state_dict, original_to_hf

if TYPE_CHECKING:
    from transformers import XCLIPModel

Rules = tuple[Rule, ...]

# The original's blocks, as the rule table names them (one "{i}" for the layer).
VISION_BLOCK, TEXT_BLOCK, MIT_BLOCK, PROMPT_BLOCK = (
    f"{stack}." for stack in (rules.VISION, rules.TEXT, rules.MIT, rules.PROMPT)
)
# The packed attentions (in_proj rows q, k, v): module pattern and the stack whose site shows it.
PACKED = {
    "vision attn": (VISION_BLOCK + "attn", VISION),
    "message attn": (VISION_BLOCK + "message_attn", VISION),
    "text attn": (TEXT_BLOCK + "attn", TEXT),
    "MIT attn": (MIT_BLOCK + "attn", MIT),
}
# Each stack's block pattern, its site name and the Hyper field counting its blocks.
STACKS = {
    VISION: (VISION_BLOCK, "vision_layers"),
    TEXT: (TEXT_BLOCK, "text_layers"),
    MIT: (MIT_BLOCK, "mit_layers"),
    PROMPT: (PROMPT_BLOCK, "prompt_layers"),
}
# Where a block's parameters first act, by name prefix inside the block, in the order the block
# computes its sites; a parameter under no prefix acts at the block's output.
_CLIP_BLOCK = {"ln_1.": SELF_ATTENTION, "attn.": SELF_ATTENTION}
_MESSAGE = {"message_fc.": MESSAGE_FC, "message_ln.": MESSAGE_LN, "message_attn.": MESSAGE_ATTENTION}
PARTS = {
    VISION: {**_MESSAGE, **_CLIP_BLOCK},
    TEXT: _CLIP_BLOCK,
    MIT: _CLIP_BLOCK,
    PROMPT: {"norm1.": CROSS_ATTENTION, "cross_attn.": CROSS_ATTENTION},
}
ORDER = (MESSAGE_FC, MESSAGE_LN, MESSAGE_ATTENTION, SELF_ATTENTION, CROSS_ATTENTION, OUTPUT)


@dataclass(frozen=True)
class Mistake:
    name: str
    site: str  # the first site in forward order it moves: where it was planted, or its first consumer
    rules: Rules = RULES
    hyper: Hyper | None = None  # the config's hyper-parameters when the mistake is in the config


# The harmless twins, by the start of their names, with the proof that they change no output.
HARMLESS = {
    "q/k swapped: message attn, layer 0": (
        "in layer 0 every frame's message token is message_fc of the class token after ln_pre, which "
        "does not depend on the pixels: the T tokens attended over are identical, so every score in a "
        "row is equal, softmax is uniform whatever q and k are, and the output is the shared v"
    ),
    "q/k bias swapped: message attn, layer 0": (
        "the same proof: with identical tokens every score in a row is equal whatever the q and k biases are"
    ),
    "k bias dropped": (
        "a key bias b adds q_i · b to every score of query i, the same for every key j; softmax is "
        "shift-invariant (causal mask included), so the attention weights and the output do not change "
        "(why some ports have no key bias at all)"
    ),
}


def proof(mistake: Mistake) -> str:
    """Why a harmless twin changes nothing (KeyError for a mistake that is not harmless)."""
    return next(text for start, text in HARMLESS.items() if mistake.name.startswith(start))


def _rule(original: str) -> Rule:
    return next(r for r in RULES if r.original == original)


def _copy(rule: Rule, src: int | None = None, dst: int | None = None, **changes) -> Rule:
    """`rule` with other fields; with `src`, for original layer `src` only, landing at HF layer `dst`."""
    if src is not None:
        changes["original"] = rule.original.replace("{i}", str(src))
        changes["hf"] = tuple(h.replace("{i}", str(dst)) for h in changes.get("hf", rule.hf))
    return dataclasses.replace(rule, **changes)


def _swap_packed(
    module: str, layer: int, a: int, b: int, params: tuple[str, ...] = ("weight", "bias")
) -> Rules:
    """Rows a and b of in_proj (`params`: weight and bias, or one of them) go to each other's
    projection in one layer."""
    planted = []
    for param in params:
        rule = _rule(f"{module}.in_proj_{param}")
        hf = list(rule.hf)
        hf[a], hf[b] = hf[b], hf[a]
        planted.append(_copy(rule, layer, layer, hf=tuple(hf)))
    return (*planted, *RULES)


def _without_k(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    q, k, v = CHUNK_QKV.forward(packed)
    return q, torch.zeros_like(k), v


def _drop_k_bias(module: str, layer: int) -> Rules:
    """The k third of in_proj_bias replaced by zeros in one layer."""
    rule = _rule(f"{module}.in_proj_bias")
    return (
        _copy(rule, layer, layer, op=Op("chunk_qkv, k bias dropped", _without_k, CHUNK_QKV.reverse)),
        *RULES,
    )


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


def _wrong_heads(right: int) -> int:
    """12 -> 8 (the old port's L/14 MIT/prompt mistake), otherwise half."""
    return 8 if right == 12 else right // 2


def _middle(hyper: Hyper) -> dict[str, int]:
    """The middle block of each stack: where a mistake is planted when any block would do."""
    return {stack: getattr(hyper, field) // 2 for stack, (_, field) in STACKS.items()}


def _which(layer: int) -> str:
    """A layer as mistakes' names say it: layers 0 and 1 by number; a middle layer beyond them as "mid
    layer", since its number differs between architectures (the mistake's site names it)."""
    return f"layer {layer}" if layer <= 1 else "mid layer"


def _unless_reshaped(site: str, rows: int, columns: int) -> str:
    """`site`, or "layout" when the mistake gives a [rows, columns] tensor the other shape."""
    return site if rows == columns else "layout"


def _block_site(stack: str, layer: int, *params: str) -> str:
    """The first site that the block parameters `params` (names inside the block) act on."""
    parts = [
        next((part for p, part in PARTS[stack].items() if param.startswith(p)), OUTPUT) for param in params
    ]
    return layer_site(stack, layer, min(parts, key=ORDER.index))


def _attention_mistakes(hyper: Hyper) -> list[Mistake]:
    """q/k and k/v swapped in each attention family, weights with bias and the bias alone."""
    mid = _middle(hyper)
    planted = []
    for family, (module, stack) in PACKED.items():
        layers = [mid[stack]]
        if family == "message attn" and mid[stack] != 1:
            layers.append(1)  # the first layer in which the message tokens differ between frames
        part = MESSAGE_ATTENTION if family == "message attn" else SELF_ATTENTION
        for layer, (pair, a, b), (what, params) in itertools.product(
            layers, (("q/k", 0, 1), ("k/v", 1, 2)), (("", ("weight", "bias")), (" bias", ("bias",)))
        ):
            if pair == "k/v" and layer != mid[stack]:
                continue  # layer 1 is planted for the q/k swaps only, the subtle ones
            planted.append(
                Mistake(
                    f"{pair}{what} swapped: {family}, {_which(layer)}",
                    layer_site(stack, layer, part),
                    _swap_packed(module, layer, a, b, params),
                )
            )
    layer = mid[PROMPT]
    for a, b in (("q", "k"), ("k", "v")):
        pair = (f"{PROMPT_BLOCK}cross_attn.{a}_proj.weight", f"{PROMPT_BLOCK}cross_attn.{b}_proj.weight")
        name = f"{a}/{b} swapped: prompt cross-attn, {_which(layer)}"
        planted.append(Mistake(name, layer_site(PROMPT, layer, CROSS_ATTENTION), _swap_keys(layer, pair)))
    return planted


def _same_shape_pairs(hyper: Hyper) -> list[Mistake]:
    """In the middle block of each stack, every two tensors of one shape exchanged (the pairs the
    attention mistakes above already plant are left out)."""
    planted_above = {
        ("cross_attn.q_proj.weight", "cross_attn.k_proj.weight"),
        ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight"),
    }
    planted = []
    for stack, (block, _) in STACKS.items():
        layer = _middle(hyper)[stack]
        params = [r.original.removeprefix(block) for r in RULES if r.original.startswith(block)]
        shape = {p: _rule(block + p).shape(hyper) for p in params}
        for a, b in itertools.combinations(params, 2):
            if shape[a] != shape[b] or (a, b) in planted_above:
                continue
            planted.append(
                Mistake(
                    f"{a} ↔ {b}: {stack} {_which(layer)}",
                    _block_site(stack, layer, a, b),
                    _swap_keys(layer, (block + a, block + b)),
                )
            )
    return planted


def mistakes(hyper: Hyper) -> list[Mistake]:
    """Every planted mistake for `hyper`'s layer counts, in a middle layer where there is a choice."""
    planted = _attention_mistakes(hyper)
    for field, family, site in (
        # Layer 0's message attention cannot show wrong heads: its tokens are identical (HARMLESS).
        ("vision_heads", "vision + message", layer_site(VISION, 0, SELF_ATTENTION)),
        ("text_heads", "text", layer_site(TEXT, 0, SELF_ATTENTION)),
        ("mit_heads", "MIT", layer_site(MIT, 0, SELF_ATTENTION)),
        ("prompt_heads", "prompt cross-attn", layer_site(PROMPT, 0, CROSS_ATTENTION)),
    ):
        right = getattr(hyper, field)
        wrong = _wrong_heads(right)
        changed = dataclasses.replace(hyper, **{field: wrong})
        planted.append(Mistake(f"wrong heads: {family}", site, hyper=changed))

    planted += [
        Mistake(
            "norm1/norm3 swapped: prompt layers",
            layer_site(PROMPT, 0, CROSS_ATTENTION),
            _swap_keys(
                None, *((f"{PROMPT_BLOCK}norm1.{p}", f"{PROMPT_BLOCK}norm3.{p}") for p in ("weight", "bias"))
            ),
        ),
        # A transpose that changes the shape is the layout check's to catch: site "layout".
        Mistake(
            "missing transpose: visual.proj",
            _unless_reshaped("cls_features", hyper.vision_width, hyper.embed_dim),
            _with_op("visual.proj", RENAME),
        ),
        Mistake(
            "missing transpose: text_projection",
            _unless_reshaped("text_embeds_raw", hyper.text_width, hyper.embed_dim),
            _with_op("text_projection", RENAME),
        ),
        Mistake(
            "transposed prompts_visual_proj",
            _unless_reshaped("img_features", hyper.vision_width, hyper.embed_dim),
            _with_op("prompts_visual_proj", TRANSPOSE),
        ),
        Mistake(
            "visual.proj / text_projection swapped",
            _unless_reshaped("cls_features", hyper.vision_width, hyper.text_width),
            _swap_keys(None, ("visual.proj", "text_projection")),
        ),
    ]
    for stack, (block, field) in STACKS.items():
        layers = getattr(hyper, field)
        if layers > 1:
            m = (layers - 1) // 2
            # Block m's first site: its message token in the vision tower, its attention elsewhere.
            site = layer_site(
                stack, m, {VISION: MESSAGE_FC, PROMPT: CROSS_ATTENTION}.get(stack, SELF_ATTENTION)
            )
            planted.append(
                Mistake(f"off by one: {stack} blocks m and m + 1 swapped", site, _swap_layers(block, m))
            )
        else:
            planted.append(
                Mistake(f"off by one: {stack} block i -> i + 1", "layout", _shift_layers(block, layers))
            )
    return planted + _same_shape_pairs(hyper)


def harmless(hyper: Hyper) -> list[Mistake]:
    """The `HARMLESS` twins, planted: verification must pass them (|Δ| at rounding level). `site` is
    where each is planted, the site that must NOT move."""
    message, _ = PACKED["message attn"]
    layer0 = layer_site(VISION, 0, MESSAGE_ATTENTION)
    planted = [
        Mistake("q/k swapped: message attn, layer 0", layer0, _swap_packed(message, 0, 0, 1)),
        Mistake("q/k bias swapped: message attn, layer 0", layer0, _swap_packed(message, 0, 0, 1, ("bias",))),
    ]
    mid = _middle(hyper)
    for family, (module, stack) in PACKED.items():
        layer = mid[stack]
        site = layer_site(stack, layer, MESSAGE_ATTENTION if family == "message attn" else SELF_ATTENTION)
        planted.append(
            Mistake(f"k bias dropped: {family}, {_which(layer)}", site, _drop_k_bias(module, layer))
        )
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
