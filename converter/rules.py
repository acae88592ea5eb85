"""The conversion rules: one table from original X-CLIP keys to transformers' `XCLIPModel` keys.

Each rule names an original key pattern, its HF key pattern(s) and an operation with a reverse,
so both directions are derived from the same table:

    original -> HF : `original_to_hf`        HF -> original : `hf_to_original`

`{i}` stands for a layer index. Operations return views where they can (the q/k/v split, the
transposes), so converting costs no copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from converter.errors import ConverterError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Op:
    """A tensor operation between one original tensor and one or more HF tensors."""

    name: str
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    reverse: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]


RENAME = Op("rename", lambda t: (t,), lambda ts: ts[0])
# The original multiplies `x @ P`; an nn.Linear computes `x @ W.T`, so W = P.T.
TRANSPOSE = Op("transpose", lambda t: (t.t(),), lambda ts: ts[0].t())
# nn.MultiheadAttention packs q, k, v in that order along dim 0 of in_proj_weight/in_proj_bias.
CHUNK_QKV = Op("chunk_qkv", lambda t: tuple(t.chunk(3, dim=0)), lambda ts: torch.cat(ts, dim=0))


@dataclass(frozen=True)
class Rule:
    original: str
    hf: tuple[str, ...]
    op: Op = RENAME
    _original_re: re.Pattern = field(init=False, repr=False, compare=False)
    _hf_res: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_original_re", _compile(self.original))
        object.__setattr__(self, "_hf_res", tuple(_compile(p) for p in self.hf))


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


def _fill(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("{i}", index)


# ---- small helpers that expand into rules ------------------------------------------------------


def _param(original: str, hf: str, op: Op = RENAME) -> list[Rule]:
    return [Rule(original, (hf,), op)]


def _linear(original: str, hf: str) -> list[Rule]:
    """A module with `.weight` and `.bias` (Linear, LayerNorm) renamed as a whole."""
    return [Rule(f"{original}.{p}", (f"{hf}.{p}",)) for p in ("weight", "bias")]


def _packed_attention(original: str, hf: str) -> list[Rule]:
    """nn.MultiheadAttention -> separate q/k/v projections plus out_proj."""
    return [
        Rule(f"{original}.in_proj_{p}", tuple(f"{hf}.{x}_proj.{p}" for x in "qkv"), CHUNK_QKV)
        for p in ("weight", "bias")
    ] + _linear(f"{original}.out_proj", f"{hf}.out_proj")


def _clip_block(original: str, hf: str, attention: str = "self_attn") -> list[Rule]:
    """CLIP's ResidualAttentionBlock (pre-LN attention + QuickGELU MLP)."""
    return [
        *_packed_attention(f"{original}.attn", f"{hf}.{attention}"),
        *_linear(f"{original}.ln_1", f"{hf}.layer_norm1"),
        *_linear(f"{original}.ln_2", f"{hf}.layer_norm2"),
        *_linear(f"{original}.mlp.c_fc", f"{hf}.mlp.fc1"),
        *_linear(f"{original}.mlp.c_proj", f"{hf}.mlp.fc2"),
    ]


# ---- the table ---------------------------------------------------------------------------------

VISION_BLOCK = "visual.transformer.resblocks.{i}"
PROMPT_LAYER = "prompts_generator.decoder.{i}"

RULES: tuple[Rule, ...] = (
    # text tower
    *_param("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    *_param("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    *_clip_block("transformer.resblocks.{i}", "text_model.encoder.layers.{i}"),
    *_linear("ln_final", "text_model.final_layer_norm"),
    *_param("text_projection", "text_projection.weight", TRANSPOSE),
    # vision tower (CLIP blocks plus X-CLIP's cross-frame message attention)
    *_param("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    *_param("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    *_param("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    *_linear("visual.ln_pre", "vision_model.pre_layernorm"),
    *_clip_block(VISION_BLOCK, "vision_model.encoder.layers.{i}"),
    *_linear(f"{VISION_BLOCK}.message_fc", "vision_model.encoder.layers.{i}.message_fc"),
    *_linear(f"{VISION_BLOCK}.message_ln", "vision_model.encoder.layers.{i}.message_ln"),
    *_packed_attention(f"{VISION_BLOCK}.message_attn", "vision_model.encoder.layers.{i}.message_attn"),
    *_linear("visual.ln_post", "vision_model.post_layernorm"),
    *_param("visual.proj", "visual_projection.weight", TRANSPOSE),
    # multi-frame integration transformer (MIT)
    *_param("mit.positional_embedding", "mit.position_embedding"),
    *_clip_block("mit.resblocks.{i}", "mit.encoder.layers.{i}"),
    # video-specific prompt generator
    *_linear("prompts_visual_ln", "prompts_visual_layernorm"),
    # Used as `x @ P` in the original AND in XCLIPModel (a bare Parameter): no transpose.
    *_param("prompts_visual_proj", "prompts_visual_projection"),
    *_linear("prompts_generator.norm", "prompts_generator.layernorm"),
    *_param("prompts_generator.alpha", "prompts_generator.alpha"),
    # Not nn.MultiheadAttention: separate bias-free q/k/v projections, same names on both sides.
    *_param(f"{PROMPT_LAYER}.cross_attn.q_proj.weight", f"{PROMPT_LAYER}.cross_attn.q_proj.weight"),
    *_param(f"{PROMPT_LAYER}.cross_attn.k_proj.weight", f"{PROMPT_LAYER}.cross_attn.k_proj.weight"),
    *_param(f"{PROMPT_LAYER}.cross_attn.v_proj.weight", f"{PROMPT_LAYER}.cross_attn.v_proj.weight"),
    *_linear(f"{PROMPT_LAYER}.cross_attn.proj", f"{PROMPT_LAYER}.cross_attn.proj"),
    *_linear(f"{PROMPT_LAYER}.norm1", f"{PROMPT_LAYER}.norm1"),
    *_linear(f"{PROMPT_LAYER}.norm3", f"{PROMPT_LAYER}.norm3"),
    *_linear(f"{PROMPT_LAYER}.mlp.0", f"{PROMPT_LAYER}.mlp.0"),
    *_linear(f"{PROMPT_LAYER}.mlp.3", f"{PROMPT_LAYER}.mlp.3"),
    *_param("logit_scale", "logit_scale"),
)


# ---- applying the table ------------------------------------------------------------------------


def _match(rules: tuple[Rule, ...], key: str, side: str) -> tuple[int, int, str | None] | None:
    """Find (rule number, position among the rule's keys, layer index) for `key` on one side."""
    for number, rule in enumerate(rules):
        patterns = (rule._original_re,) if side == "original" else rule._hf_res
        for position, pattern in enumerate(patterns):
            m = pattern.match(key)
            if m:
                return number, position, m.groupdict().get("i")
    return None


def original_to_hf(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map an original state dict to XCLIPModel keys. Every source key must be consumed."""
    rules = tuple(rules)
    converted: StateDict = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        found = _match(rules, key, "original")
        if found is None:
            unmapped.append(f"{key} {_shape(tensor)}")
            continue
        rule, index = rules[found[0]], found[2]
        if rule.op is CHUNK_QKV and tensor.shape[0] % 3:
            unmapped.append(f"{key} {_shape(tensor)} (dim 0 does not split into q, k, v)")
            continue
        parts = rule.op.forward(tensor)
        for pattern, part in zip(rule.hf, parts, strict=True):
            converted[_fill(pattern, index)] = part
    if unmapped:
        raise MappingReport(unmapped=unmapped).error("original -> HF")
    return converted


def hf_to_original(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map XCLIPModel keys back to the original layout (the exact reverse of `original_to_hf`)."""
    rules = tuple(rules)
    groups: dict[tuple[int, str | None], dict[int, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        found = _match(rules, key, "hf")
        if found is None:
            unmapped.append(f"{key} {_shape(tensor)}")
            continue
        number, position, index = found
        groups.setdefault((number, index), {})[position] = tensor
    restored: StateDict = {}
    missing: list[str] = []
    for (rule_index, index), parts in groups.items():
        rule = rules[rule_index]
        absent = [_fill(p, index) for n, p in enumerate(rule.hf) if n not in parts]
        if absent:
            missing.extend(absent)
            continue
        restored[_fill(rule.original, index)] = rule.op.reverse(tuple(parts[n] for n in range(len(rule.hf))))
    if unmapped or missing:
        raise MappingReport(unmapped=unmapped, missing=missing).error("HF -> original")
    return restored


# ---- strict accounting -------------------------------------------------------------------------


@dataclass
class MappingReport:
    """Everything that did not line up, reported in one error."""

    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unmapped or self.missing or self.mismatched)

    def error(self, context: str) -> ConverterError:
        lines = [f"{context}: the checkpoint does not match the expected X-CLIP layout"]
        for title, items in (
            ("source keys no rule consumes", self.unmapped),
            ("target keys not produced", self.missing),
            ("shape mismatches", self.mismatched),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        return ConverterError("\n".join(lines))


def check_against(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> MappingReport:
    """Compare keys and shapes of `converted` with those of `expected` (e.g. a meta-device model)."""
    report = MappingReport()
    for key in converted.keys() - expected.keys():
        report.unmapped.append(f"{key} {_shape(converted[key])}")
    for key in expected.keys() - converted.keys():
        report.missing.append(f"{key} {_shape(expected[key])}")
    for key in converted.keys() & expected.keys():
        if converted[key].shape != expected[key].shape:
            report.mismatched.append(
                f"{key}: checkpoint gives {_shape(converted[key])}, config expects {_shape(expected[key])}"
            )
    for items in (report.unmapped, report.missing, report.mismatched):
        items.sort()
    return report


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))
