"""The original checkpoint layout, key by key and shape by shape, for a set of hyperparameters.

Written from the original architecture (and checked against the inventory of all 18 real
checkpoints); the HF layout is derived from it through the rule table and checked against
transformers' own XCLIPModel in the tests. Knowing shapes without building a model keeps
transformers' modelling code out of conversions that do not run the model (`--no-verify`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from converter.config import Hyper
from converter.rules import check_against, original_to_hf

Shape = tuple[int, ...]


def _norm(prefix: str, width: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _linear(prefix: str, out_features: int, in_features: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def _packed_attention(prefix: str, width: int) -> dict[str, Shape]:
    return {
        f"{prefix}.in_proj_weight": (3 * width, width),
        f"{prefix}.in_proj_bias": (3 * width,),
        **_linear(f"{prefix}.out_proj", width, width),
    }


def _clip_block(prefix: str, width: int, mlp: int) -> dict[str, Shape]:
    return {
        **_packed_attention(f"{prefix}.attn", width),
        **_norm(f"{prefix}.ln_1", width),
        **_linear(f"{prefix}.mlp.c_fc", mlp, width),
        **_linear(f"{prefix}.mlp.c_proj", width, mlp),
        **_norm(f"{prefix}.ln_2", width),
    }


def original_shapes(h: Hyper) -> dict[str, Shape]:
    """Every key of an original X-CLIP state dict with its shape."""
    W, TW, E = h.vision_width, h.text_width, h.embed_dim  # noqa: N806 - the paper's names
    grid = h.image_size // h.patch_size
    shapes: dict[str, Shape] = {
        "positional_embedding": (h.context_length, TW),
        "text_projection": (TW, E),
        "logit_scale": (),
        "prompts_visual_proj": (W, E),
        "prompts_generator.alpha": (E,),
        **_norm("prompts_generator.norm", E),
    }
    for i in range(h.prompt_layers):
        p = f"prompts_generator.decoder.{i}"
        shapes.update({f"{p}.cross_attn.{x}_proj.weight": (E, E) for x in "qkv"})
        shapes.update(_linear(f"{p}.cross_attn.proj", E, E))
        shapes.update({**_norm(f"{p}.norm1", E), **_norm(f"{p}.norm3", E)})
        shapes.update({**_linear(f"{p}.mlp.0", 4 * E, E), **_linear(f"{p}.mlp.3", E, 4 * E)})
    shapes["mit.positional_embedding"] = (1, h.frames, E)
    for i in range(h.mit_layers):
        shapes.update(_clip_block(f"mit.resblocks.{i}", E, h.mit_mlp))
    shapes.update(
        {
            "visual.class_embedding": (W,),
            "visual.positional_embedding": (grid * grid + 1, W),
            "visual.proj": (W, E),
            "visual.conv1.weight": (W, 3, h.patch_size, h.patch_size),
            **_norm("visual.ln_pre", W),
        }
    )
    for i in range(h.vision_layers):
        p = f"visual.transformer.resblocks.{i}"
        shapes.update({**_linear(f"{p}.message_fc", W, W), **_norm(f"{p}.message_ln", W)})
        shapes.update(_packed_attention(f"{p}.message_attn", W))
        shapes.update(_clip_block(p, W, h.vision_mlp))
    shapes.update(_norm("visual.ln_post", W))
    for i in range(h.text_layers):
        shapes.update(_clip_block(f"transformer.resblocks.{i}", TW, h.text_mlp))
    shapes.update({"token_embedding.weight": (h.vocab_size, TW), **_norm("ln_final", TW)})
    shapes.update(_norm("prompts_visual_ln", W))
    return shapes


def hf_shapes(h: Hyper) -> dict[str, torch.Tensor]:
    """The XCLIPModel state dict's keys with meta tensors of the right shapes (no memory used)."""
    return original_to_hf({k: torch.empty(s, device="meta") for k, s in original_shapes(h).items()})


def check_state_dict(state_dict: Mapping[str, torch.Tensor], h: Hyper) -> None:
    """Raise one error listing every unexpected, missing and mis-shaped key against `h`."""
    report = check_against(state_dict, hf_shapes(h))
    if report:
        raise report.error("checkpoint vs config")
