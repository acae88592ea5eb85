"""An independent implementation of the ORIGINAL X-CLIP forward pass on an original state dict.

It is the project's oracle: written from the original's architecture (microsoft/VideoX, X-CLIP:
the cross-frame message attention, the MIT with its residual around the whole stack, the prompt
generator's own cross-attention, heads = width // 64), checked against the outputs the ORIGINAL
code computed for the golden fixtures (tests/data/goldens), using only torch.nn.functional and
sharing no code with transformers' XCLIP modelling, so that a converted model is checked against
something that cannot share its mistakes.

`original_sites` runs it as a generator of (site, tensor) in forward order: every block's attention
output and output in every stack, each vision block's message token step by step, and the final
outputs. A consumer can
compare each site as it comes and drop it, so no more than one layer's activations are held at once.
`original_forward` collects the final outputs into a dict.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from converter.config import MIT_BLOCKS, PROMPT_BLOCKS, TEXT_BLOCKS, VISION_BLOCKS, depth

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]

_LN_EPS = 1e-5  # every LayerNorm of the original uses the nn.LayerNorm default

# Block prefixes of the four stacks, whose depth is counted from the keys (`depth`).
_VISION, _TEXT, _MIT, _PROMPTS = VISION_BLOCKS, TEXT_BLOCKS, MIT_BLOCKS, PROMPT_BLOCKS

# ---- sites: the names under which `original_sites` yields what it computes -----------------------
# A layer's site is "<stack> layer <i>, <part>"; the stacks' names as the sites spell them.
VISION, TEXT, MIT, PROMPT = "vision", "text", "MIT", "prompt generator"
# The parts of a vision block, in the order the original computes them; the block's output last.
MESSAGE_FC = "message_fc (the message token)"
MESSAGE_LN = "message_ln (the message attention's input)"
MESSAGE_ATTENTION = "message attention (across frames)"
MESSAGE_TOKEN = "message token after the message attention"
# Every block: its attention's output before the residual (self-attention over the frame tokens and
# the message token in a vision block; the prompt generator's cross-attention), then the block's.
SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
OUTPUT = "output"
VISION_EMBEDDINGS = "vision embeddings (after ln_pre)"
TEXT_EMBEDDINGS = "text embeddings"


def layer_site(stack: str, layer: int, part: str = OUTPUT) -> str:
    """The name of one site in one layer of a stack, e.g. 'vision layer 6, output'."""
    return f"{stack} layer {layer}, {part}"


@dataclass(frozen=True)
class OriginalHeads:
    """Head counts of the four attention families (not stored in a checkpoint)."""

    vision: int
    text: int
    mit: int
    prompts: int

    @classmethod
    def from_state_dict(cls, state_dict: StateDict) -> OriginalHeads:
        """The original's rule for every family: width // 64 (E // 64 for MIT and prompts)."""
        vision_width = state_dict["visual.conv1.weight"].shape[0]
        text_width = state_dict["text_projection"].shape[0]
        embed_dim = state_dict["text_projection"].shape[1]
        return cls(
            vision=vision_width // 64,
            text=text_width // 64,
            mit=embed_dim // 64,
            prompts=embed_dim // 64,
        )


def causal_mask(
    length: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Additive [length, length] mask of the text tower: -inf strictly above the diagonal, 0 elsewhere."""
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)


def _ln(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], _LN_EPS)


def _linear(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return F.linear(x, sd[prefix + "weight"], sd.get(prefix + "bias"))


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _mlp(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    """CLIP MLP: c_fc -> QuickGELU -> c_proj."""
    return _linear(_quick_gelu(_linear(x, sd, prefix + "c_fc.")), sd, prefix + "c_proj.")


def _self_attention(x: Tensor, sd: StateDict, prefix: str, heads: int, mask: Tensor | None = None) -> Tensor:
    """nn.MultiheadAttention with q = k = v = x, on batch-first x [N, L, D].

    One GEMM on the packed in_proj (rows q, k, v in that order); the output is split by a view.
    """
    n, length, width = x.shape
    qkv = F.linear(x, sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"])
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _linear(out.transpose(1, 2).reshape(n, length, width), sd, prefix + "out_proj.")


def _cross_attention(x: Tensor, memory: Tensor, sd: StateDict, prefix: str, heads: int) -> Tensor:
    """The prompt generator's own attention: separate bias-free q/k/v, `proj` with bias,
    scale (E / heads) ** -0.5 (the SDPA default)."""
    n, length, width = x.shape
    m = memory.shape[1]
    head_dim = width // heads
    q = F.linear(x, sd[prefix + "q_proj.weight"]).view(n, length, heads, head_dim).transpose(1, 2)
    k = F.linear(memory, sd[prefix + "k_proj.weight"]).view(n, m, heads, head_dim).transpose(1, 2)
    v = F.linear(memory, sd[prefix + "v_proj.weight"]).view(n, m, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return _linear(out.transpose(1, 2).reshape(n, length, width), sd, prefix + "proj.")


Sites = Iterator[tuple[str, Tensor]]


def _prompt_layer(x: Tensor, visual: Tensor, sd: StateDict, layer: int, heads: int) -> Sites:
    """PromptGeneratorLayer: x + cross_attn(norm1 x, visual, visual), then x + mlp(norm3 x)
    (mlp.0 Linear E->4E, QuickGELU, dropout = identity in eval, mlp.3 Linear 4E->E). Yields the
    cross-attention's output and the layer's; returns the layer's."""
    prefix = f"{_PROMPTS}{layer}."
    attended = _cross_attention(_ln(x, sd, prefix + "norm1."), visual, sd, prefix + "cross_attn.", heads)
    yield layer_site(PROMPT, layer, CROSS_ATTENTION), attended
    x = x + attended
    hidden = _quick_gelu(_linear(_ln(x, sd, prefix + "norm3."), sd, prefix + "mlp.0."))
    x = x + _linear(hidden, sd, prefix + "mlp.3.")
    yield layer_site(PROMPT, layer), x
    return x


def _residual_block(
    x: Tensor, sd: StateDict, stack: str, prefix: str, layer: int, heads: int, mask: Tensor | None = None
) -> Sites:
    """Pre-LN CLIP block (text and MIT): x + attn(ln_1 x), then x + mlp(ln_2 x). Yields the
    attention's output and the block's; returns the block's."""
    prefix = f"{prefix}{layer}."
    attended = _self_attention(_ln(x, sd, prefix + "ln_1."), sd, prefix + "attn.", heads, mask)
    yield layer_site(stack, layer, SELF_ATTENTION), attended
    x = x + attended
    x = x + _mlp(_ln(x, sd, prefix + "ln_2."), sd, prefix + "mlp.")
    yield layer_site(stack, layer), x
    return x


def _cross_frame_block(x: Tensor, sd: StateDict, layer: int, heads: int, frames: int) -> Sites:
    """CrossFramelAttentionBlock on batch-first x [B*T, L, W], frames batch-major. Yields the message
    token's steps, the self-attention's output and the block's; returns the block's."""
    prefix = f"{_VISION}{layer}."
    bt, _, width = x.shape
    # The message token comes from the RAW class token (no LayerNorm before message_fc).
    msg = _linear(x[:, 0], sd, prefix + "message_fc.")
    yield layer_site(VISION, layer, MESSAGE_FC), msg
    msg = msg.view(bt // frames, frames, width)
    # message_ln is applied to msg and attention runs across the T frames of each video.
    normed = _ln(msg, sd, prefix + "message_ln.")
    yield layer_site(VISION, layer, MESSAGE_LN), normed
    attended = _self_attention(normed, sd, prefix + "message_attn.", heads)
    yield layer_site(VISION, layer, MESSAGE_ATTENTION), attended
    msg = (msg + attended).reshape(bt, width)
    yield layer_site(VISION, layer, MESSAGE_TOKEN), msg
    x = torch.cat([x, msg.unsqueeze(1)], dim=1)
    attended = _self_attention(_ln(x, sd, prefix + "ln_1."), sd, prefix + "attn.", heads)
    yield layer_site(VISION, layer, SELF_ATTENTION), attended
    x = (x + attended)[:, :-1]  # drop the message token before the MLP
    x = x + _mlp(_ln(x, sd, prefix + "ln_2."), sd, prefix + "mlp.")
    yield layer_site(VISION, layer), x
    return x


def _compute_state_dict(state_dict: StateDict) -> dict[str, Tensor]:
    """Strip an optional `module.` prefix; cast half/bfloat16 to float32, as the original loads
    weights into a float32 model (float32/float64 stay as they are)."""
    out = {}
    for key, value in state_dict.items():
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        out[key.removeprefix("module.")] = value
    return out


def _check_heads(width: int, heads: int, family: str) -> None:
    if heads <= 0 or width % heads:
        raise ValueError(f"{family}: {heads} heads do not divide width {width}; pass OriginalHeads")


# The final outputs `original_forward` returns: the arrays of the goldens' expected.npz.
OUTPUTS = (
    "vision_last_hidden_state", "vision_pooled", "cls_features", "mit_last_hidden_state", "video_embeds",
    "text_last_hidden_state", "text_pooled", "text_embeds_raw", "img_features", "prompts", "text_embeds",
    "video_embeds_normalized", "text_embeds_normalized", "logit_scale_exp", "logits",
)  # fmt: skip


@torch.no_grad()
def original_sites(
    state_dict: StateDict,
    pixel_values: Tensor,
    input_ids: Tensor,
    heads: OriginalHeads | None = None,
) -> Sites:
    """Run the original X-CLIP on an original state dict, yielding (site, tensor) in forward order.

    The order: the vision embeddings; per vision block its message token after message_fc, after
    message_ln, the message attention's output, the token after that attention's residual, the
    block's self-attention output and the block's output; the pooled vision features and
    `cls_features`; per MIT block its attention's output and its output, the MIT output; the text
    embeddings, per text block the same two, the final text LayerNorm, the pooled and projected
    text; the patch features the prompt generator attends to, per prompt-generator layer its
    cross-attention's output and its output (before alpha), the prompts; the normalised embeddings
    and the logits. Every name in `OUTPUTS` is among them (see
    `original_forward` for their shapes).
    """
    sd = _compute_state_dict(state_dict)
    heads = heads or OriginalHeads.from_state_dict(sd)
    dtype = sd["visual.conv1.weight"].dtype
    device = sd["visual.conv1.weight"].device
    vision_width = sd["visual.conv1.weight"].shape[0]
    text_width, embed_dim = sd["text_projection"].shape
    _check_heads(vision_width, heads.vision, "vision")
    _check_heads(text_width, heads.text, "text")
    _check_heads(embed_dim, heads.mit, "mit")
    _check_heads(embed_dim, heads.prompts, "prompts")

    # ---- vision tower (CrossFrameCommunicationTransformer) ----
    b, t = pixel_values.shape[:2]
    pixels = pixel_values.to(device=device, dtype=dtype).reshape(b * t, *pixel_values.shape[2:])
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)  # [B*T, N, W]
    cls_token = sd["visual.class_embedding"].expand(b * t, 1, vision_width)
    x = torch.cat([cls_token, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre.")
    yield VISION_EMBEDDINGS, x
    for i in range(depth(sd, _VISION)):
        x = yield from _cross_frame_block(x, sd, i, heads.vision, t)
    yield "vision_last_hidden_state", x
    vision_pooled = _ln(x[:, 0], sd, "visual.ln_post.")
    yield "vision_pooled", vision_pooled
    cls_features = (vision_pooled @ sd["visual.proj"]).view(b, t, embed_dim)
    yield "cls_features", cls_features

    # ---- MIT (multi-frame integration transformer), residual around the whole stack ----
    y = cls_features + sd["mit.positional_embedding"]
    for i in range(depth(sd, _MIT)):
        y = yield from _residual_block(y, sd, MIT, _MIT, i, heads.mit)
    mit_last_hidden_state = y + cls_features
    yield "mit_last_hidden_state", mit_last_hidden_state
    video_embeds = mit_last_hidden_state.mean(dim=1)
    yield "video_embeds", video_embeds

    # ---- text tower (causal), pooled at the EOT token = input_ids.argmax(-1) ----
    k, length = input_ids.shape
    ids = input_ids.to(device)
    z = F.embedding(ids, sd["token_embedding.weight"]) + sd["positional_embedding"][:length]
    yield TEXT_EMBEDDINGS, z
    mask = causal_mask(length, dtype, device)
    for i in range(depth(sd, _TEXT)):
        z = yield from _residual_block(z, sd, TEXT, _TEXT, i, heads.text, mask)
    text_last_hidden_state = _ln(z, sd, "ln_final.")
    yield "text_last_hidden_state", text_last_hidden_state
    text_pooled = text_last_hidden_state[torch.arange(k, device=device), ids.argmax(dim=-1)]
    yield "text_pooled", text_pooled
    text_embeds_raw = text_pooled @ sd["text_projection"]
    yield "text_embeds_raw", text_embeds_raw

    # ---- video-specific prompt generator ----
    # Patch tokens go to the prompt branch WITHOUT ln_post.
    img = _ln(x[:, 1:], sd, "prompts_visual_ln.") @ sd["prompts_visual_proj"]
    img_features = img.view(b, t, -1, embed_dim).mean(dim=1)  # [B, N, E]
    yield "img_features", img_features
    visual = _ln(img_features, sd, "prompts_generator.norm.")  # applied once, shared by all layers
    p = text_embeds_raw.unsqueeze(0).expand(b, k, embed_dim)
    for i in range(depth(sd, _PROMPTS)):
        p = yield from _prompt_layer(p, visual, sd, i, heads.prompts)
    prompts = sd["prompts_generator.alpha"] * p  # alpha scales the whole output, residual included
    yield "prompts", prompts
    text_embeds = text_embeds_raw.unsqueeze(0) + prompts
    yield "text_embeds", text_embeds

    # ---- logits: exp(logit_scale) * cosine, per video against its own prompted texts ----
    video_embeds_normalized = video_embeds / video_embeds.norm(dim=-1, keepdim=True)
    yield "video_embeds_normalized", video_embeds_normalized
    text_embeds_normalized = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    yield "text_embeds_normalized", text_embeds_normalized
    logit_scale_exp = sd["logit_scale"].exp()
    yield "logit_scale_exp", logit_scale_exp
    yield (
        "logits",
        torch.einsum("bd,bkd->bk", video_embeds_normalized, logit_scale_exp * text_embeds_normalized),
    )


def original_forward(
    state_dict: StateDict,
    pixel_values: Tensor,
    input_ids: Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, Tensor]:
    """Run the original X-CLIP on an original state dict; its final outputs (`OUTPUTS`).

    pixel_values [B, T, 3, H, W], input_ids [K, L] -> dict with the keys of the goldens' expected.npz:
    logits [B, K] (logits_per_video), logit_scale_exp [], video_embeds / video_embeds_normalized [B, E],
    text_embeds_raw [K, E], prompts / text_embeds / text_embeds_normalized [B, K, E],
    img_features [B, N, E], cls_features / mit_last_hidden_state [B, T, E],
    vision_pooled [B*T, W], vision_last_hidden_state [B*T, N+1, W],
    text_pooled [K, TW], text_last_hidden_state [K, L, TW].
    """
    sites = original_sites(state_dict, pixel_values, input_ids, heads)
    return {name: tensor for name, tensor in sites if name in OUTPUTS}
