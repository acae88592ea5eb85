"""The conversion rules: one table from original X-CLIP keys to transformers' `XCLIPModel` keys, from
which both directions and both layouts' shapes derive. The ops return views: converting copies no weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import groupby

import torch

from converter.config import MIT_BLOCKS, PROMPT_BLOCKS, TEXT_BLOCKS, VISION_BLOCKS, Hyper
from converter.errors import ConverterError, escape, listed

StateDict = dict[str, torch.Tensor]
Shape = tuple[int, ...]


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
    """One original key pattern, its HF key pattern(s), the op between them and the original
    tensor's shape; `layers` names the `Hyper` field counting the `{i}` blocks (None without `{i}`)."""

    original: str
    hf: tuple[str, ...]
    shape: Callable[[Hyper], Shape]
    op: Op = RENAME
    layers: str | None = None

    @cached_property
    def patterns(self) -> dict[str, tuple[re.Pattern, ...]]:
        """The compiled key patterns of each side ("original", "hf"); `{i}` captures the layer."""
        return {"original": (_compile(self.original),), "hf": tuple(_compile(p) for p in self.hf)}


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


def _fill(pattern: str, index: str | None) -> str:
    return pattern if index is None else pattern.replace("{i}", index)


# Helpers that expand into rules; widths are `Hyper` field names, stated once per stack.
def _param(original: str, hf: str, *dims: str | int, op: Op = RENAME, layers: str | None = None) -> Rule:

    def shape(h: Hyper) -> Shape:
        return tuple(d if isinstance(d, int) else getattr(h, d) for d in dims)

    return Rule(original, (hf,), shape, op, layers)


def _affine(original: str, hf: str, *dims: str, layers: str | None = None) -> list[Rule]:
    """A LayerNorm's or Linear's weight (shape `dims`) and bias (the weight's first dim)."""
    return [
        _param(f"{original}.weight", f"{hf}.weight", *dims, layers=layers),
        _param(f"{original}.bias", f"{hf}.bias", dims[0], layers=layers),
    ]


def _packed_attention(original: str, hf: str, width: str, layers: str | None = None) -> list[Rule]:
    """nn.MultiheadAttention -> separate q/k/v projections plus out_proj."""

    def in_proj(part: str, shape: Callable[[int], Shape]) -> Rule:
        qkv = tuple(f"{hf}.{x}_proj.{part}" for x in "qkv")
        return Rule(f"{original}.in_proj_{part}", qkv, lambda h: shape(getattr(h, width)), CHUNK_QKV, layers)

    return [
        in_proj("weight", lambda w: (3 * w, w)),
        in_proj("bias", lambda w: (3 * w,)),
        *_affine(f"{original}.out_proj", f"{hf}.out_proj", width, width, layers=layers),
    ]


def _clip_block(original: str, hf: str, width: str, mlp: str, layers: str) -> list[Rule]:
    """CLIP's ResidualAttentionBlock (pre-LN attention + QuickGELU MLP)."""
    return [
        *_packed_attention(f"{original}.attn", f"{hf}.self_attn", width, layers),
        *_affine(f"{original}.ln_1", f"{hf}.layer_norm1", width, layers=layers),
        *_affine(f"{original}.mlp.c_fc", f"{hf}.mlp.fc1", mlp, width, layers=layers),
        *_affine(f"{original}.mlp.c_proj", f"{hf}.mlp.fc2", width, mlp, layers=layers),
        *_affine(f"{original}.ln_2", f"{hf}.layer_norm2", width, layers=layers),
    ]


def _prompt_block(block: str, width: str, mlp: str, layers: str) -> list[Rule]:
    """PromptGeneratorLayer, named alike on both sides (its attention: `oracle._prompt_layer`)."""
    qkv = [f"{block}.cross_attn.{x}_proj.weight" for x in "qkv"]
    return [
        *(_param(key, key, width, width, layers=layers) for key in qkv),
        *_affine(f"{block}.cross_attn.proj", f"{block}.cross_attn.proj", width, width, layers=layers),
        *_affine(f"{block}.norm1", f"{block}.norm1", width, layers=layers),
        *_affine(f"{block}.norm3", f"{block}.norm3", width, layers=layers),
        *_affine(f"{block}.mlp.0", f"{block}.mlp.0", mlp, width, layers=layers),
        *_affine(f"{block}.mlp.3", f"{block}.mlp.3", width, mlp, layers=layers),
    ]


# In the order the original checkpoints store their keys: consecutive rules of one stack form its
# block, expanded layer by layer (`original_shapes`).

VISION, TEXT, MIT, PROMPT = (
    blocks + "{i}" for blocks in (VISION_BLOCKS, TEXT_BLOCKS, MIT_BLOCKS, PROMPT_BLOCKS)
)
VISION_HF = "vision_model.encoder.layers.{i}"
# Widths: W vision, TW text, E the joint embedding (the MIT's and prompt generator's too), P patch size.
W, TW, E, P = "vision_width", "text_width", "embed_dim", "patch_size"

RULES: tuple[Rule, ...] = (
    _param("positional_embedding", "text_model.embeddings.position_embedding.weight", "context_length", TW),
    _param("text_projection", "text_projection.weight", TW, E, op=TRANSPOSE),
    _param("logit_scale", "logit_scale"),
    # The video-specific prompt generator. `prompts_visual_proj` is used as `x @ P` in the original
    # AND in XCLIPModel (a bare Parameter): no transpose.
    _param("prompts_visual_proj", "prompts_visual_projection", W, E),
    _param("prompts_generator.alpha", "prompts_generator.alpha", E),
    *_affine("prompts_generator.norm", "prompts_generator.layernorm", E),
    *_prompt_block(PROMPT, E, "prompt_mlp", "prompt_layers"),
    # The multi-frame integration transformer (MIT).
    _param("mit.positional_embedding", "mit.position_embedding", 1, "frames", E),
    *_clip_block(MIT, "mit.encoder.layers.{i}", E, "mit_mlp", "mit_layers"),
    # The vision tower: CLIP blocks plus X-CLIP's cross-frame message attention.
    _param("visual.class_embedding", "vision_model.embeddings.class_embedding", W),
    _param(
        "visual.positional_embedding",
        "vision_model.embeddings.position_embedding.weight",
        "vision_positions",
        W,
    ),
    _param("visual.proj", "visual_projection.weight", W, E, op=TRANSPOSE),
    _param("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", W, 3, P, P),
    *_affine("visual.ln_pre", "vision_model.pre_layernorm", W),
    *_affine(f"{VISION}.message_fc", f"{VISION_HF}.message_fc", W, W, layers="vision_layers"),
    *_affine(f"{VISION}.message_ln", f"{VISION_HF}.message_ln", W, layers="vision_layers"),
    *_packed_attention(f"{VISION}.message_attn", f"{VISION_HF}.message_attn", W, "vision_layers"),
    *_clip_block(VISION, VISION_HF, W, "vision_mlp", "vision_layers"),
    *_affine("visual.ln_post", "vision_model.post_layernorm", W),
    # The text tower.
    *_clip_block(TEXT, "text_model.encoder.layers.{i}", TW, "text_mlp", "text_layers"),
    _param("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "vocab_size", TW),
    *_affine("ln_final", "text_model.final_layer_norm", TW),
    *_affine("prompts_visual_ln", "prompts_visual_layernorm", W),
)


def _match(rules: tuple[Rule, ...], key: str, side: str) -> tuple[int, int, str | None] | None:
    """(rule number, position among the rule's keys, layer index) for `key` on `side`, or None."""
    for number, rule in enumerate(rules):
        for position, pattern in enumerate(rule.patterns[side]):
            if m := pattern.match(key):
                return number, position, m.groupdict().get("i")
    return None


def _layout_error(
    context: str, unmapped: Sequence[str], missing: Sequence[str] = (), mismatched: Sequence[str] = ()
) -> ConverterError:
    lines = [f"{context}: the checkpoint does not match the expected X-CLIP layout"]
    for title, items in (
        ("source keys no rule consumes", unmapped),
        ("target keys not produced", missing),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines.append(f"  {len(items):,} {title}:")
            lines.extend(f"    {item}" for item in listed(sorted(items)))
    return ConverterError("\n".join(lines))


def original_to_hf(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map an original state dict to XCLIPModel keys. Every source key must be consumed."""
    rules = tuple(rules)
    converted: StateDict = {}
    unmapped = []
    for key, tensor in state_dict.items():
        if (found := _match(rules, key, "original")) is None:
            unmapped.append(f"{escape(key)} {list(tensor.shape)}")
        elif rules[found[0]].op is CHUNK_QKV and tensor.shape[0] % 3:
            unmapped.append(f"{escape(key)} {list(tensor.shape)} (dim 0 does not split into q, k, v)")
        else:
            rule, index = rules[found[0]], found[2]
            for pattern, part in zip(rule.hf, rule.op.forward(tensor), strict=True):
                converted[_fill(pattern, index)] = part
    if unmapped:
        raise _layout_error("original -> HF", unmapped)
    return converted


def hf_to_original(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule] = RULES) -> StateDict:
    """Map XCLIPModel keys back to the original layout (the exact reverse of `original_to_hf`)."""
    rules = tuple(rules)
    # A rule's HF keys (q, k, v) come back together: group the parts by rule and layer.
    groups: dict[tuple[int, str | None], dict[int, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        if (found := _match(rules, key, "hf")) is None:
            unmapped.append(f"{escape(key)} {list(tensor.shape)}")
        else:
            number, position, index = found
            groups.setdefault((number, index), {})[position] = tensor
    restored: StateDict = {}
    missing: list[str] = []
    for (number, index), parts in groups.items():
        rule = rules[number]
        if len(parts) < len(rule.hf):
            missing += [escape(_fill(p, index)) for n, p in enumerate(rule.hf) if n not in parts]
        else:
            restored[_fill(rule.original, index)] = rule.op.reverse(tuple(parts[n] for n in sorted(parts)))
    if unmapped or missing:
        raise _layout_error("HF -> original", unmapped, missing)
    return restored


def original_shapes(h: Hyper) -> dict[str, Shape]:
    """Every key of an original X-CLIP state dict with its shape, in the checkpoint's own order."""
    shapes: dict[str, Shape] = {}
    for layers, run in groupby(RULES, key=lambda rule: rule.layers):
        run = list(run)
        for index in map(str, range(getattr(h, layers))) if layers else [None]:
            for rule in run:
                shapes[_fill(rule.original, index)] = rule.shape(h)
    return shapes


def hf_shapes(h: Hyper) -> dict[str, torch.Tensor]:
    """The XCLIPModel state dict's keys with meta tensors of the right shapes (no memory used)."""
    return original_to_hf({k: torch.empty(s, device="meta") for k, s in original_shapes(h).items()})


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    h: Hyper,
    context: str = "checkpoint vs config",
    unmapped: Sequence[str] = (),
) -> None:
    """Raise one error, headed by `context`, listing every unexpected (with the source's `unmapped`),
    missing and mis-shaped key."""
    expected = hf_shapes(h)
    unmapped = [
        *unmapped,
        *(f"{escape(k)} {list(state_dict[k].shape)}" for k in state_dict.keys() - expected.keys()),
    ]
    missing = [f"{escape(k)} {list(expected[k].shape)}" for k in expected.keys() - state_dict.keys()]
    mismatched = [
        f"{escape(k)}: checkpoint gives {list(state_dict[k].shape)}, config expects {list(expected[k].shape)}"
        for k in state_dict.keys() & expected.keys()
        if state_dict[k].shape != expected[k].shape
    ]
    if unmapped or missing or mismatched:
        raise _layout_error(context, unmapped, missing, mismatched)
