"""Hyper-parameters of an X-CLIP model: read off a state dict, given by the registry, or read from an
`XCLIPConfig` JSON — and turned into transformers' `XCLIPConfig`.

`FIELDS` is the one table of the vocabulary: each hyper-parameter with where `XCLIPConfig` keeps it,
how it is read off an original state dict, and its value for a published variant. `Hyper` is the
common currency: comparing two of them names exactly the fields that disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from converter.clip import CONTEXT_LENGTH, HEAD_DIM, MIT_LAYERS, PROMPT_LAYERS, VOCAB_SIZE
from converter.errors import ConverterError, escape
from converter.registry import Variant

if TYPE_CHECKING:
    from transformers import XCLIPConfig


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

    @property
    def vision_positions(self) -> int:
        """Patch positions plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def prompt_mlp(self) -> int:
        """The prompt generator's MLP width: 4 E, fixed in the original's code."""
        return 4 * self.embed_dim

    def differences(self, other: Hyper) -> list[str]:
        return [
            f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


class _Shapes:
    """Read shapes and stack depths off an original state dict, naming a missing key."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.state_dict = state_dict

    def __call__(self, key: str, dim: int) -> int:
        if key not in self.state_dict:
            raise ConverterError(f"cannot infer the model: key {key!r} is missing from the checkpoint")
        shape = tuple(self.state_dict[key].shape)
        if len(shape) <= dim:
            raise ConverterError(f"cannot infer the model: {key!r} has shape {list(shape)}, too few dims")
        return shape[dim]

    def layers(self, prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in self.state_dict if (m := pattern.match(k))})

    def grid(self) -> int:
        positions = self("visual.positional_embedding", 0) - 1
        grid = math.isqrt(max(positions, 0))
        if grid * grid != positions or positions <= 0:
            raise ConverterError(
                f"visual.positional_embedding has {positions} patch positions, not a square grid"
            )
        return grid


@dataclass(frozen=True)
class Field:
    """One hyper-parameter: the original code's name for it (None where it has none), where
    XCLIPConfig keeps it (the first path is read; every path is written), how it is read off an
    original state dict, and its value for a published variant."""

    name: str
    original_name: str | None
    config_paths: tuple[str, ...]
    inferred: Callable[[_Shapes], int]
    published: Callable[[Variant], int]


def _dim(
    name: str,
    original: str | None,
    paths: tuple[str, ...],
    key: str,
    dim: int,
    published: Callable[[Variant], int],
) -> Field:
    """A size read off one dimension of one tensor."""
    return Field(name, original, paths, lambda s: s(key, dim), published)


def _depth(name: str, original: str, path: str, prefix: str, published: Callable[[Variant], int]) -> Field:
    """A stack's depth, counted from its block keys."""
    return Field(name, original, (path,), lambda s: s.layers(prefix), published)


def _heads(name: str, original: str, path: str, key: str, dim: int, width: str) -> Field:
    """Heads are not stored: the original derives them as width // 64 (`width` names the Arch field)."""
    return Field(
        name,
        original,
        (path,),
        lambda s: s(key, dim) // HEAD_DIM,
        lambda v: getattr(v.arch, width) // HEAD_DIM,
    )


FIELDS: tuple[Field, ...] = (
    _dim("embed_dim", "embed_dim", ("projection_dim", "vision_config.mit_hidden_size"), "text_projection", 1,
         lambda v: v.arch.embed_dim),
    Field("image_size", "image_resolution", ("vision_config.image_size",),
          lambda s: s.grid() * s("visual.conv1.weight", 2), lambda v: v.image_size),
    _dim("patch_size", "vision_patch_size", ("vision_config.patch_size",), "visual.conv1.weight", 2,
         lambda v: v.arch.patch_size),
    _dim("frames", "DATA.NUM_FRAMES", ("vision_config.num_frames",), "mit.positional_embedding", 1,
         lambda v: v.frames),
    _dim("vision_width", "vision_width", ("vision_config.hidden_size",), "visual.conv1.weight", 0,
         lambda v: v.arch.vision_width),
    _depth("vision_layers", "vision_layers", "vision_config.num_hidden_layers",
           "visual.transformer.resblocks.", lambda v: v.arch.vision_layers),
    _heads("vision_heads", "vision_heads", "vision_config.num_attention_heads", "visual.conv1.weight", 0,
           "vision_width"),
    _dim("vision_mlp", None, ("vision_config.intermediate_size",),
         "visual.transformer.resblocks.0.mlp.c_fc.weight", 0, lambda v: 4 * v.arch.vision_width),
    _depth("text_layers", "transformer_layers", "text_config.num_hidden_layers", "transformer.resblocks.",
           lambda v: v.arch.text_layers),
    _dim("text_width", "transformer_width", ("text_config.hidden_size",), "text_projection", 0,
         lambda v: v.arch.embed_dim),
    _heads("text_heads", "transformer_heads", "text_config.num_attention_heads", "text_projection", 0,
           "embed_dim"),
    _dim("text_mlp", None, ("text_config.intermediate_size",), "transformer.resblocks.0.mlp.c_fc.weight", 0,
         lambda v: 4 * v.arch.embed_dim),
    _dim("vocab_size", "vocab_size", ("text_config.vocab_size",), "token_embedding.weight", 0,
         lambda v: VOCAB_SIZE),
    _dim("context_length", "context_length", ("text_config.max_position_embeddings",), "positional_embedding",
         0, lambda v: CONTEXT_LENGTH),
    _depth("mit_layers", "mit_layers", "vision_config.mit_num_hidden_layers", "mit.resblocks.",
           lambda v: MIT_LAYERS),
    _heads("mit_heads", "mit_heads", "vision_config.mit_num_attention_heads", "text_projection", 1,
           "embed_dim"),
    _dim("mit_mlp", "mit_mlp_width", ("vision_config.mit_intermediate_size",),
         "mit.resblocks.0.mlp.c_fc.weight", 0, lambda v: 4 * v.arch.embed_dim),
    _depth("prompt_layers", "prompts_layers", "prompt_layers", "prompts_generator.decoder.",
           lambda v: PROMPT_LAYERS),
    _heads("prompt_heads", "prompts_heads", "prompt_num_attention_heads", "text_projection", 1, "embed_dim"),
)  # fmt: skip

# (family, width field, heads field): each attention family's heads must divide its width.
HEAD_FAMILIES = (
    ("vision", "vision_width", "vision_heads"),
    ("text", "text_width", "text_heads"),
    ("MIT", "embed_dim", "mit_heads"),
    ("prompt", "embed_dim", "prompt_heads"),
)


def hyper_for_variant(variant: Variant) -> Hyper:
    return Hyper(**{f.name: f.published(variant) for f in FIELDS})


def infer_hyper(state_dict: Mapping[str, torch.Tensor]) -> Hyper:
    """Read every hyper-parameter off an original state dict's keys and shapes.

    Head counts follow the original's rule, width // 64; `check_heads` rejects widths below 64.
    """
    shapes = _Shapes(state_dict)
    return Hyper(**{f.name: f.inferred(shapes) for f in FIELDS})


def check_heads(h: Hyper) -> None:
    """Inferred heads are width // 64: below width 64 that is 0, and only a --config can say."""
    for family, width in (("vision", h.vision_width), ("text", h.text_width), ("MIT/prompt", h.embed_dim)):
        if width < HEAD_DIM:
            raise ConverterError(
                f"cannot infer the {family} head count: width {width} is below {HEAD_DIM} "
                "(the original uses width // 64); pass --config with an XCLIPConfig JSON"
            )


def to_config(h: Hyper) -> XCLIPConfig:
    """transformers' XCLIPConfig (5.x constructors; `from_text_vision_configs` is gone)."""
    from transformers import XCLIPConfig

    values: dict[str, Any] = {"text_config": {}, "vision_config": {}}
    for f in FIELDS:
        for path in f.config_paths:
            *parent, leaf = path.split(".")
            (values[parent[0]] if parent else values)[leaf] = getattr(h, f.name)
    config = XCLIPConfig(**values)
    config.architectures = ["XCLIPModel"]
    return config


def hyper_from_config(config: XCLIPConfig) -> Hyper:
    return Hyper(**{f.name: _get(config, f.config_paths[0]) for f in FIELDS})


def _get(config: object, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def load_config_file(path: str | Path, *, where: str | None = None) -> XCLIPConfig:
    """Read and validate an XCLIPConfig JSON as `save_pretrained` writes it, field by field; errors
    start with `where` (default: "--config PATH")."""
    from transformers import XCLIPConfig

    path = Path(path)
    where = where or f"--config {escape(str(path))}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise ConverterError(f"{where} is a folder: give the config.json file inside it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConverterError(f"{where}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConverterError(f"{where}: expected a JSON object, found {type(data).__name__}")
    if data.get("model_type") != "xclip":
        raise ConverterError(f'{where}: expected an XCLIPConfig JSON ("model_type": "xclip")')
    for section in ("text_config", "vision_config"):
        if section in data and not isinstance(data[section], dict):
            raise ConverterError(
                f"{where}: {section} must be an object, found {type(data[section]).__name__}"
            )
    for f in FIELDS:
        for path_ in f.config_paths:
            *parent, leaf = path_.split(".")
            value = (data.get(parent[0], {}) if parent else data).get(leaf)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConverterError(f"{where}: {path_} must be a positive integer, found {value!r}")
    try:
        config = XCLIPConfig.from_dict(data)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; the message is what matters
        raise ConverterError(f"{where}: transformers cannot build an XCLIPConfig from it ({err})") from None
    hyper = hyper_from_config(config)
    for family, width_field, heads_field in HEAD_FAMILIES:
        width, heads = getattr(hyper, width_field), getattr(hyper, heads_field)
        if width % heads:
            raise ConverterError(f"{where}: {heads} {family} heads do not divide the width {width}")
    for f in FIELDS:
        values = {path_: _get(config, path_) for path_ in f.config_paths}
        if len(set(values.values())) > 1:
            raise ConverterError(f"{where}: {' and '.join(f'{k} {v}' for k, v in values.items())} must agree")
    return config


def check_variant(hyper: Hyper, variant: Variant, source: str) -> None:
    """A file for the wrong model is caught here, before anything is built."""
    diffs = hyper.differences(hyper_for_variant(variant))
    if diffs:
        raise ConverterError(
            f"{source} does not look like {variant.name} "
            f"(checkpoint vs registry): {'; '.join(diffs)}. Check --model-name, or omit it to convert "
            "the checkpoint as it is"
        )
