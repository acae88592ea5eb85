"""Hyperparameters of an X-CLIP model: inferred from a state dict, given by the registry, or read
from an `XCLIPConfig` JSON — and turned into transformers' `XCLIPConfig`.

`Hyper` is the common currency: comparing two of them names exactly the fields that disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter.errors import ConverterError
from converter.registry import Variant

if TYPE_CHECKING:
    from transformers import XCLIPConfig

HEAD_DIM = 64  # the original derives every head count as width // 64
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
MIT_LAYERS = 1
PROMPT_LAYERS = 2


@dataclass(frozen=True)
class Hyper:
    embed_dim: int
    image_size: int
    patch_size: int
    frames: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    vocab_size: int
    context_length: int
    mit_layers: int
    mit_heads: int
    mit_mlp: int
    prompt_layers: int
    prompt_heads: int

    def differences(self, other: Hyper) -> list[str]:
        return [
            f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def hyper_for_variant(variant: Variant) -> Hyper:
    a = variant.arch
    return Hyper(
        embed_dim=a.embed_dim,
        image_size=variant.image_size,
        patch_size=a.patch_size,
        frames=variant.frames,
        vision_width=a.vision_width,
        vision_layers=a.vision_layers,
        vision_heads=a.vision_width // HEAD_DIM,
        vision_mlp=4 * a.vision_width,
        text_width=a.embed_dim,
        text_layers=a.text_layers,
        text_heads=a.embed_dim // HEAD_DIM,
        text_mlp=4 * a.embed_dim,
        vocab_size=VOCAB_SIZE,
        context_length=CONTEXT_LENGTH,
        mit_layers=MIT_LAYERS,
        mit_heads=a.embed_dim // HEAD_DIM,
        mit_mlp=4 * a.embed_dim,
        prompt_layers=PROMPT_LAYERS,
        prompt_heads=a.embed_dim // HEAD_DIM,
    )


def infer_hyper(state_dict: Mapping[str, torch.Tensor]) -> Hyper:
    """Read every hyperparameter off an original state dict's keys and shapes.

    Head counts follow the original's rule, width // 64; `check_heads` rejects widths below 64.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConverterError(f"cannot infer the model: key {key!r} is missing from the checkpoint")
        return tuple(state_dict[key].shape)

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in state_dict if (m := pattern.match(k))})

    vision_width, _, patch_size, _ = shape("visual.conv1.weight")
    positions = shape("visual.positional_embedding")[0] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConverterError(
            f"visual.positional_embedding has {positions} patch positions, not a square grid"
        )
    text_width, embed_dim = shape("text_projection")

    return Hyper(
        embed_dim=embed_dim,
        image_size=grid * patch_size,
        patch_size=patch_size,
        frames=shape("mit.positional_embedding")[1],
        vision_width=vision_width,
        vision_layers=count("visual.transformer.resblocks."),
        vision_heads=vision_width // HEAD_DIM,
        vision_mlp=shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
        text_width=text_width,
        text_layers=count("transformer.resblocks."),
        text_heads=text_width // HEAD_DIM,
        text_mlp=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
        vocab_size=shape("token_embedding.weight")[0],
        context_length=shape("positional_embedding")[0],
        mit_layers=count("mit.resblocks."),
        mit_heads=embed_dim // HEAD_DIM,
        mit_mlp=shape("mit.resblocks.0.mlp.c_fc.weight")[0],
        prompt_layers=count("prompts_generator.decoder."),
        prompt_heads=embed_dim // HEAD_DIM,
    )


def check_heads(h: Hyper) -> None:
    """Inferred heads are width // 64: below width 64 that is 0, and only a --config can say."""
    for family, width in (("vision", h.vision_width), ("text", h.text_width), ("MIT/prompt", h.embed_dim)):
        if width < HEAD_DIM:
            raise ConverterError(
                f"cannot infer the {family} head count: width {width} is below {HEAD_DIM} "
                "(the original uses width // 64); pass --config with an XCLIPConfig JSON"
            )


def to_config(h: Hyper) -> XCLIPConfig:
    """Build transformers' XCLIPConfig (5.x constructors; `from_text_vision_configs` is gone)."""
    from transformers import XCLIPConfig

    text_config = {
        "vocab_size": h.vocab_size,
        "hidden_size": h.text_width,
        "intermediate_size": h.text_mlp,
        "num_hidden_layers": h.text_layers,
        "num_attention_heads": h.text_heads,
        "max_position_embeddings": h.context_length,
    }
    vision_config = {
        "hidden_size": h.vision_width,
        "intermediate_size": h.vision_mlp,
        "num_hidden_layers": h.vision_layers,
        "num_attention_heads": h.vision_heads,
        "image_size": h.image_size,
        "patch_size": h.patch_size,
        "num_frames": h.frames,
        "mit_hidden_size": h.embed_dim,
        "mit_intermediate_size": h.mit_mlp,
        "mit_num_hidden_layers": h.mit_layers,
        "mit_num_attention_heads": h.mit_heads,
    }
    return XCLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=h.embed_dim,
        prompt_layers=h.prompt_layers,
        prompt_num_attention_heads=h.prompt_heads,
    )


def hyper_from_config(config: XCLIPConfig) -> Hyper:
    t, v = config.text_config, config.vision_config
    return Hyper(
        embed_dim=config.projection_dim,
        image_size=v.image_size,
        patch_size=v.patch_size,
        frames=v.num_frames,
        vision_width=v.hidden_size,
        vision_layers=v.num_hidden_layers,
        vision_heads=v.num_attention_heads,
        vision_mlp=v.intermediate_size,
        text_width=t.hidden_size,
        text_layers=t.num_hidden_layers,
        text_heads=t.num_attention_heads,
        text_mlp=t.intermediate_size,
        vocab_size=t.vocab_size,
        context_length=t.max_position_embeddings,
        mit_layers=v.mit_num_hidden_layers,
        mit_heads=v.mit_num_attention_heads,
        mit_mlp=v.mit_intermediate_size,
        prompt_layers=config.prompt_layers,
        prompt_heads=config.prompt_num_attention_heads,
    )


def load_config_file(path: str | Path) -> XCLIPConfig:
    """Read an XCLIPConfig JSON as `save_pretrained` writes it."""
    from transformers import XCLIPConfig

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConverterError(f"--config {path}: cannot read JSON ({err})") from None
    if data.get("model_type") != "xclip":
        raise ConverterError(f"--config {path}: expected an XCLIPConfig JSON (model_type 'xclip')")
    return XCLIPConfig.from_dict(data)


def check_variant(hyper: Hyper, variant: Variant, source: str) -> None:
    """A file for the wrong model is caught here, before anything is built."""
    diffs = hyper.differences(hyper_for_variant(variant))
    if diffs:
        raise ConverterError(
            f"{source} does not look like {variant.name} "
            f"(checkpoint vs registry): {'; '.join(diffs)}. Check --model-name, or omit it to convert "
            "the checkpoint as it is"
        )
