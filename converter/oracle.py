"""The oracle: the ORIGINAL X-CLIP forward pass (microsoft/VideoX) in torch.nn.functional alone, sharing
no code with transformers' XCLIP and checked against the original code's outputs (tests/data/goldens).
`original_sites` yields (site, tensor) in forward order, so a consumer holds one layer at a time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from converter.clip import original_heads
from converter.config import MIT_BLOCKS, PROMPT_BLOCKS, TEXT_BLOCKS, VISION_BLOCKS, depth

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]
Sites = Iterator[tuple[str, Tensor]]

_LN_EPS = 1e-5  # every LayerNorm of the original uses the nn.LayerNorm default

# Site names: a layer's site is "<stack> layer <i>, <part>".
VISION, TEXT, MIT, PROMPT = "vision", "text", "MIT", "prompt generator"
# The parts of a vision block, in the order the original computes them.
MESSAGE_FC = "message_fc (the message token)"
MESSAGE_LN = "message_ln (the message attention's input)"
MESSAGE_ATTENTION = "message attention (across frames)"
MESSAGE_TOKEN = "message token after the message attention"
# Every block: its attention's output before the residual, then the block's output.
SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
OUTPUT = "output"
VISION_EMBEDDINGS = "vision embeddings (after ln_pre)"
TEXT_EMBEDDINGS = "text embeddings"
_BLOCK_PREFIXES = {VISION: VISION_BLOCKS, TEXT: TEXT_BLOCKS, MIT: MIT_BLOCKS, PROMPT: PROMPT_BLOCKS}


def layer_site(stack: str, layer: int, part: str = OUTPUT) -> str:
    """E.g. 'vision layer 6, output'."""
    return f"{stack} layer {layer}, {part}"


class OriginalHeads(NamedTuple):
    """Head counts of the four attention families (a checkpoint does not store them)."""

    vision: int
    text: int
    mit: int
    prompts: int

    @classmethod
    def from_state_dict(cls, state_dict: StateDict) -> OriginalHeads:
        """The original's own rule (`clip.original_heads`); the MIT and prompts run at width E."""
        text_width, embed_dim = state_dict["text_projection"].shape
        vision = original_heads(state_dict["visual.conv1.weight"].shape[0])
        return cls(vision, original_heads(text_width), original_heads(embed_dim), original_heads(embed_dim))


def causal_mask(length: int) -> Tensor:
    """Additive [length, length] mask of the text tower: -inf strictly above the diagonal, 0 elsewhere."""
    return torch.full((length, length), float("-inf")).triu_(1)


def _ln(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], _LN_EPS)


def _linear(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return F.linear(x, sd[prefix + "weight"], sd.get(prefix + "bias"))


def _mlp(x: Tensor, sd: StateDict, fc1: str, fc2: str) -> Tensor:
    """Linear -> QuickGELU -> Linear (CLIP's c_fc/c_proj, the prompt generator's mlp.0/mlp.3)."""
    hidden = _linear(x, sd, fc1)
    return _linear(hidden * torch.sigmoid(1.702 * hidden), sd, fc2)


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _self_attention(x: Tensor, sd: StateDict, prefix: str, heads: int, mask: Tensor | None = None) -> Tensor:
    """nn.MultiheadAttention with q = k = v = x, batch first: one GEMM on the packed in_proj (q, k, v)."""
    qkv = F.linear(x, sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"])
    return _linear(_attention(*qkv.chunk(3, dim=-1), heads, mask), sd, prefix + "out_proj.")


def _prompt_layer(x: Tensor, visual: Tensor, sd: StateDict, layer: int, heads: int) -> Sites:
    """PromptGeneratorLayer: x + cross_attn(norm1 x, visual), then x + mlp(norm3 x); its attention is
    not nn.MultiheadAttention (bias-free q/k/v, `proj` with a bias)."""
    prefix = f"{PROMPT_BLOCKS}{layer}."
    q = _linear(_ln(x, sd, prefix + "norm1."), sd, prefix + "cross_attn.q_proj.")
    k, v = (_linear(visual, sd, f"{prefix}cross_attn.{n}_proj.") for n in "kv")
    attended = _linear(_attention(q, k, v, heads), sd, prefix + "cross_attn.proj.")
    yield layer_site(PROMPT, layer, CROSS_ATTENTION), attended
    x = x + attended
    x = x + _mlp(_ln(x, sd, prefix + "norm3."), sd, prefix + "mlp.0.", prefix + "mlp.3.")
    yield layer_site(PROMPT, layer), x
    return x


def _clip_block(
    x: Tensor, sd: StateDict, stack: str, layer: int, heads: int, mask: Tensor | None = None
) -> Sites:
    """Pre-LN CLIP block (a vision block's message token, the last, dropped after the attention)."""
    prefix = f"{_BLOCK_PREFIXES[stack]}{layer}."
    attended = _self_attention(_ln(x, sd, prefix + "ln_1."), sd, prefix + "attn.", heads, mask)
    yield layer_site(stack, layer, SELF_ATTENTION), attended
    x = x + attended
    if stack == VISION:
        x = x[:, :-1]
    x = x + _mlp(_ln(x, sd, prefix + "ln_2."), sd, prefix + "mlp.c_fc.", prefix + "mlp.c_proj.")
    yield layer_site(stack, layer), x
    return x


def _cross_frame_block(x: Tensor, sd: StateDict, layer: int, heads: int, frames: int) -> Sites:
    """CrossFramelAttentionBlock on x [B*T, L, W]: a message token from the RAW class token (no LayerNorm
    before message_fc) attends across each video's frames, then joins its frame's tokens in a CLIP block."""
    prefix = f"{VISION_BLOCKS}{layer}."
    bt, _, width = x.shape
    msg = _linear(x[:, 0], sd, prefix + "message_fc.")
    yield layer_site(VISION, layer, MESSAGE_FC), msg
    msg = msg.view(bt // frames, frames, width)
    normed = _ln(msg, sd, prefix + "message_ln.")
    yield layer_site(VISION, layer, MESSAGE_LN), normed
    attended = _self_attention(normed, sd, prefix + "message_attn.", heads)
    yield layer_site(VISION, layer, MESSAGE_ATTENTION), attended
    msg = (msg + attended).reshape(bt, width)
    yield layer_site(VISION, layer, MESSAGE_TOKEN), msg
    return (yield from _clip_block(torch.cat([x, msg.unsqueeze(1)], dim=1), sd, VISION, layer, heads))


@torch.no_grad()
def original_sites(
    state_dict: StateDict, pixel_values: Tensor, input_ids: Tensor, heads: OriginalHeads | None = None
) -> Sites:
    """(site, tensor) in forward order; half precision is computed in float32, as the original loads it."""
    sd = {
        key.removeprefix("module."): t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        for key, t in state_dict.items()
    }
    heads = heads or OriginalHeads.from_state_dict(sd)
    conv = sd["visual.conv1.weight"]
    vision_width, dtype, device = conv.shape[0], conv.dtype, conv.device
    text_width, embed_dim = sd["text_projection"].shape
    widths = (vision_width, text_width, embed_dim, embed_dim)
    for family, count, width in zip(OriginalHeads._fields, heads, widths, strict=True):
        if count <= 0 or width % count:
            raise ValueError(f"{family}: {count} heads do not divide width {width}; pass OriginalHeads")

    # ---- vision tower (CrossFrameCommunicationTransformer) ----
    b, t = pixel_values.shape[:2]
    pixels = pixel_values.to(device=device, dtype=dtype).flatten(0, 1)
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)  # [B*T, N, W]
    cls_token = sd["visual.class_embedding"].expand(b * t, 1, vision_width)
    x = _ln(torch.cat([cls_token, x], dim=1) + sd["visual.positional_embedding"], sd, "visual.ln_pre.")
    yield VISION_EMBEDDINGS, x
    for i in range(depth(sd, VISION_BLOCKS)):
        x = yield from _cross_frame_block(x, sd, i, heads.vision, t)
    pooled = _ln(x[:, 0], sd, "visual.ln_post.")
    cls_features = (pooled @ sd["visual.proj"]).view(b, t, embed_dim)
    yield from dict(vision_last_hidden_state=x, vision_pooled=pooled, cls_features=cls_features).items()

    # ---- MIT (multi-frame integration transformer), residual around the whole stack ----
    y = cls_features + sd["mit.positional_embedding"]
    for i in range(depth(sd, MIT_BLOCKS)):
        y = yield from _clip_block(y, sd, MIT, i, heads.mit)
    mit_last_hidden_state = y + cls_features
    video_embeds = mit_last_hidden_state.mean(dim=1)
    yield from dict(mit_last_hidden_state=mit_last_hidden_state, video_embeds=video_embeds).items()

    # ---- text tower (causal), pooled at the EOT token = input_ids.argmax(-1) ----
    k, length = input_ids.shape
    ids = input_ids.to(device)
    z = F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"][:length]
    yield TEXT_EMBEDDINGS, z
    mask = causal_mask(length).to(device, dtype)
    for i in range(depth(sd, TEXT_BLOCKS)):
        z = yield from _clip_block(z, sd, TEXT, i, heads.text, mask)
    z = _ln(z, sd, "ln_final.")
    eot = z[torch.arange(k, device=device), ids.argmax(dim=-1)]
    text_embeds_raw = eot @ sd["text_projection"]
    yield from dict(text_last_hidden_state=z, text_pooled=eot, text_embeds_raw=text_embeds_raw).items()

    # ---- video-specific prompt generator: patch tokens WITHOUT ln_post ----
    img = _ln(x[:, 1:], sd, "prompts_visual_ln.") @ sd["prompts_visual_proj"]
    img_features = img.view(b, t, -1, embed_dim).mean(dim=1)  # [B, N, E]
    yield "img_features", img_features
    visual = _ln(img_features, sd, "prompts_generator.norm.")  # applied once, shared by all layers
    p = text_embeds_raw.unsqueeze(0).expand(b, k, embed_dim)
    for i in range(depth(sd, PROMPT_BLOCKS)):
        p = yield from _prompt_layer(p, visual, sd, i, heads.prompts)
    prompts = sd["prompts_generator.alpha"] * p  # alpha scales the whole output, residual included
    text_embeds = text_embeds_raw.unsqueeze(0) + prompts
    yield from dict(prompts=prompts, text_embeds=text_embeds).items()

    # ---- logits: exp(logit_scale) * cosine, per video against its own prompted texts ----
    video_embeds_normalized = video_embeds / video_embeds.norm(dim=-1, keepdim=True)
    text_embeds_normalized = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    logit_scale_exp = sd["logit_scale"].exp()
    logits = torch.einsum("bd,bkd->bk", video_embeds_normalized, logit_scale_exp * text_embeds_normalized)
    yield "video_embeds_normalized", video_embeds_normalized
    yield "text_embeds_normalized", text_embeds_normalized
    yield from dict(logit_scale_exp=logit_scale_exp, logits=logits).items()
