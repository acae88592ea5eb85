"""The conversion rules: one table from original X-CLIP keys to transformers' `XCLIPModel` keys.

Each rule names an original key pattern, its HF key pattern(s), an operation with a reverse, and the
original tensor's shape as a formula over the hyper-parameters, so everything is derived from it:

    original -> HF : `original_to_hf`        HF -> original : `hf_to_original`
    layouts        : `original_shapes(h)`, `hf_shapes(h)` (the HF one through each rule's op)

`{i}` stands for a layer index. Operations return views where they can (the q/k/v split, the
transposes), so converting costs no copy of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import groupby

import torch

from converter.config import MIT_BLOCKS, PROMPT_BLOCKS, TEXT_BLOCKS, VISION_BLOCKS, Hyper
from converter.errors import ConverterError, escape, listed

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


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """One original key pattern, its HF key pattern(s), the op between them, and the original
    tensor's shape as a formula over the hyper-parameters. `layers` names the `Hyper` field that
    counts the `{i}` blocks (None for a key without `{i}`)."""

    original: str
    hf: tuple[str, ...]
    shape: Callable[[Hyper], Shape]
    op: Op = RENAME
    layers: str | None = None
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
# Widths are given as `Hyper` field names, so each helper states its shapes once for every stack.


def _dims(h: Hyper, *names: str | int) -> Shape:
    """A shape from Hyper field names and literal sizes: _dims(h, "embed_dim", 4) -> (E, 4)."""
    return tuple(n if isinstance(n, int) else getattr(h, n) for n in names)


def _param(
    original: str, hf: str, *dims: str | int, op: Op = RENAME, layers: str | None = None
) -> list[Rule]:
    return [Rule(original, (hf,), lambda h: _dims(h, *dims), op, layers)]


def _norm(original: str, hf: str, width: str, layers: str | None = None) -> list[Rule]:
    """LayerNorm: `.weight` and `.bias` of the same width."""
    return [
        Rule(f"{original}.{p}", (f"{hf}.{p}",), lambda h: _dims(h, width), RENAME, layers)
        for p in ("weight", "bias")
    ]


def _linear(original: str, hf: str, out: str, inp: str, layers: str | None = None) -> list[Rule]:
    """nn.Linear [out, in] with its bias [out], renamed as a whole."""
    return [
        Rule(f"{original}.weight", (f"{hf}.weight",), lambda h: _dims(h, out, inp), RENAME, layers),
        Rule(f"{original}.bias", (f"{hf}.bias",), lambda h: _dims(h, out), RENAME, layers),
    ]


def _packed_attention(original: str, hf: str, width: str, layers: str | None = None) -> list[Rule]:
    """nn.MultiheadAttention -> separate q/k/v projections plus out_proj."""
    qkv = tuple(f"{hf}.{x}_proj" for x in "qkv")
    return [
        Rule(f"{original}.in_proj_weight", tuple(f"{p}.weight" for p in qkv),
             lambda h: (3 * getattr(h, width), getattr(h, width)), CHUNK_QKV, layers),
        Rule(f"{original}.in_proj_bias", tuple(f"{p}.bias" for p in qkv),
             lambda h: (3 * getattr(h, width),), CHUNK_QKV, layers),
        *_linear(f"{original}.out_proj", f"{hf}.out_proj", width, width, layers),
    ]  # fmt: skip


def _clip_block(original: str, hf: str, width: str, mlp: str, layers: str) -> list[Rule]:
    """CLIP's ResidualAttentionBlock (pre-LN attention + QuickGELU MLP)."""
    return [
        *_packed_attention(f"{original}.attn", f"{hf}.self_attn", width, layers),
        *_norm(f"{original}.ln_1", f"{hf}.layer_norm1", width, layers),
        *_linear(f"{original}.mlp.c_fc", f"{hf}.mlp.fc1", mlp, width, layers),
        *_linear(f"{original}.mlp.c_proj", f"{hf}.mlp.fc2", width, mlp, layers),
        *_norm(f"{original}.ln_2", f"{hf}.layer_norm2", width, layers),
    ]


# ---- the table ---------------------------------------------------------------------------------
# In the order the original checkpoints store their keys (module registration order): consecutive
# rules of one stack form its block, expanded layer by layer. Widths: W = vision_width,
# TW = text_width, E = embed_dim (also the MIT and prompt width).

VISION, TEXT, MIT, PROMPT = (
    blocks + "{i}" for blocks in (VISION_BLOCKS, TEXT_BLOCKS, MIT_BLOCKS, PROMPT_BLOCKS)
)
VISION_HF = "vision_model.encoder.layers.{i}"

RULES: tuple[Rule, ...] = (
    *_param("positional_embedding", "text_model.embeddings.position_embedding.weight",
            "context_length", "text_width"),
    # The original multiplies `x @ P` [TW, E]; nn.Linear stores [E, TW].
    *_param("text_projection", "text_projection.weight", "text_width", "embed_dim", op=TRANSPOSE),
    *_param("logit_scale", "logit_scale"),
    # video-specific prompt generator. `prompts_visual_proj` is used as `x @ P` in the original AND
    # in XCLIPModel (a bare Parameter): no transpose.
    *_param("prompts_visual_proj", "prompts_visual_projection", "vision_width", "embed_dim"),
    *_param("prompts_generator.alpha", "prompts_generator.alpha", "embed_dim"),
    *_norm("prompts_generator.norm", "prompts_generator.layernorm", "embed_dim"),
    # Its cross-attention is not nn.MultiheadAttention: separate bias-free q/k/v, same names on both sides.
    *(
        rule
        for x in "qkv"
        for rule in _param(f"{PROMPT}.cross_attn.{x}_proj.weight", f"{PROMPT}.cross_attn.{x}_proj.weight",
                           "embed_dim", "embed_dim", layers="prompt_layers")
    ),
    *_linear(f"{PROMPT}.cross_attn.proj", f"{PROMPT}.cross_attn.proj", "embed_dim", "embed_dim",
             "prompt_layers"),
    *_norm(f"{PROMPT}.norm1", f"{PROMPT}.norm1", "embed_dim", "prompt_layers"),
    *_norm(f"{PROMPT}.norm3", f"{PROMPT}.norm3", "embed_dim", "prompt_layers"),
    *_linear(f"{PROMPT}.mlp.0", f"{PROMPT}.mlp.0", "prompt_mlp", "embed_dim", "prompt_layers"),
    *_linear(f"{PROMPT}.mlp.3", f"{PROMPT}.mlp.3", "embed_dim", "prompt_mlp", "prompt_layers"),
    # multi-frame integration transformer (MIT)
    *_param("mit.positional_embedding", "mit.position_embedding", 1, "frames", "embed_dim"),
    *_clip_block(MIT, "mit.encoder.layers.{i}", "embed_dim", "mit_mlp", "mit_layers"),
    # vision tower: CLIP blocks plus X-CLIP's cross-frame message attention
    *_param("visual.class_embedding", "vision_model.embeddings.class_embedding", "vision_width"),
    *_param("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight",
            "vision_positions", "vision_width"),
    *_param("visual.proj", "visual_projection.weight", "vision_width", "embed_dim", op=TRANSPOSE),
    *_param("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight",
            "vision_width", 3, "patch_size", "patch_size"),
    *_norm("visual.ln_pre", "vision_model.pre_layernorm", "vision_width"),
    *_linear(f"{VISION}.message_fc", f"{VISION_HF}.message_fc", "vision_width", "vision_width",
             "vision_layers"),
    *_norm(f"{VISION}.message_ln", f"{VISION_HF}.message_ln", "vision_width", "vision_layers"),
    *_packed_attention(f"{VISION}.message_attn", f"{VISION_HF}.message_attn", "vision_width",
                       "vision_layers"),
    *_clip_block(VISION, VISION_HF, "vision_width", "vision_mlp", "vision_layers"),
    *_norm("visual.ln_post", "vision_model.post_layernorm", "vision_width"),
    # text tower
    *_clip_block(TEXT, "text_model.encoder.layers.{i}", "text_width", "text_mlp",
                 "text_layers"),
    *_param("token_embedding.weight", "text_model.embeddings.token_embedding.weight",
            "vocab_size", "text_width"),
    *_norm("ln_final", "text_model.final_layer_norm", "text_width"),
    *_norm("prompts_visual_ln", "prompts_visual_layernorm", "vision_width"),
)  # fmt: skip


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


def _matched(
    rules: tuple[Rule, ...], state_dict: Mapping[str, torch.Tensor], side: str
) -> tuple[list[tuple[torch.Tensor, Rule, int, str | None]], list[str]]:
    """Each tensor with (rule, position among the rule's keys, layer index), and the keys no rule matches."""
    matched, unmapped = [], []
    for key, tensor in state_dict.items():
        found = _match(rules, key, side)
        if found is None:
            unmapped.append(f"{escape(key)} {_shape(tensor)}")
        else:
            matched.append((tensor, rules[found[0]], found[1], found[2]))
    return matched, unmapped


def original_to_hf(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map an original state dict to XCLIPModel keys. Every source key must be consumed."""
    matched, unmapped = _matched(tuple(rules), state_dict, "original")
    converted: StateDict = {}
    for tensor, rule, _, index in matched:
        if rule.op is CHUNK_QKV and tensor.shape[0] % 3:
            key = _fill(rule.original, index)
            unmapped.append(f"{escape(key)} {_shape(tensor)} (dim 0 does not split into q, k, v)")
            continue
        for pattern, part in zip(rule.hf, rule.op.forward(tensor), strict=True):
            converted[_fill(pattern, index)] = part
    if unmapped:
        raise MappingReport(unmapped=unmapped).error("original -> HF")
    return converted


def hf_to_original(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map XCLIPModel keys back to the original layout (the exact reverse of `original_to_hf`)."""
    matched, unmapped = _matched(tuple(rules), state_dict, "hf")
    # A rule's HF keys (q, k, v) come back together: group the parts by rule and layer.
    groups: dict[tuple[Rule, str | None], dict[int, torch.Tensor]] = {}
    for tensor, rule, position, index in matched:
        groups.setdefault((rule, index), {})[position] = tensor
    restored: StateDict = {}
    missing: list[str] = []
    for (rule, index), parts in groups.items():
        absent = [_fill(p, index) for n, p in enumerate(rule.hf) if n not in parts]
        if absent:
            missing.extend(escape(key) for key in absent)
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
                lines.append(f"  {len(items):,} {title}:")
                lines.extend(f"    {item}" for item in listed(sorted(items)))
        return ConverterError("\n".join(lines))


def compare_layouts(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> MappingReport:
    """Compare keys and shapes of `converted` with those of `expected` (e.g. a meta-device model)."""
    report = MappingReport()
    for key in converted.keys() - expected.keys():
        report.unmapped.append(f"{escape(key)} {_shape(converted[key])}")
    for key in expected.keys() - converted.keys():
        report.missing.append(f"{escape(key)} {_shape(expected[key])}")
    for key in converted.keys() & expected.keys():
        if converted[key].shape != expected[key].shape:
            given, wanted = _shape(converted[key]), _shape(expected[key])
            report.mismatched.append(f"{escape(key)}: checkpoint gives {given}, config expects {wanted}")
    for items in (report.unmapped, report.missing, report.mismatched):
        items.sort()
    return report


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


# ---- layouts derived from the table ------------------------------------------------------------


def original_shapes(h: Hyper, rules: Iterable[Rule] = RULES) -> dict[str, Shape]:
    """Every key of an original X-CLIP state dict with its shape, in the checkpoint's own order."""
    shapes: dict[str, Shape] = {}
    for layers, run in groupby(rules, key=lambda rule: rule.layers):
        run = list(run)
        for index in range(getattr(h, layers)) if layers else [None]:
            for rule in run:
                shapes[_fill(rule.original, None if index is None else str(index))] = rule.shape(h)
    return shapes


def hf_shapes(h: Hyper) -> dict[str, torch.Tensor]:
    """The XCLIPModel state dict's keys with meta tensors of the right shapes (no memory used)."""
    return original_to_hf({k: torch.empty(s, device="meta") for k, s in original_shapes(h).items()})


def check_state_dict(state_dict: Mapping[str, torch.Tensor], h: Hyper) -> None:
    """Raise one error listing every unexpected, missing and mis-shaped key against `h`."""
    report = compare_layouts(state_dict, hf_shapes(h))
    if report:
        raise report.error("checkpoint vs config")
