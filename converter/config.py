"""Hyper-parameters of an X-CLIP model: read off a state dict, given by the registry, or read from an
`XCLIPConfig` JSON — and turned into transformers' `XCLIPConfig`.

`FIELDS` is the one table of the vocabulary: each hyper-parameter with where `XCLIPConfig` keeps it,
how it is read off an original state dict, and its value for a published variant. `Hyper` is the
common currency: comparing two of them names exactly the fields that disagree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from converter.clip import CONTEXT_LENGTH, HEAD_DIM, MIT_LAYERS, PROMPT_LAYERS, VOCAB_SIZE, original_heads
from converter.errors import ConverterError, escape, reason
from converter.reader import CONFIG_LIMIT, finite_number, read_json_object, shown
from converter.registry import Variant

if TYPE_CHECKING:
    from transformers import XCLIPConfig


# The original's four stacks of blocks, as its keys name them: "<prefix><index>.<parameter>".
VISION_BLOCKS = "visual.transformer.resblocks."
TEXT_BLOCKS = "transformer.resblocks."
MIT_BLOCKS = "mit.resblocks."
PROMPT_BLOCKS = "prompts_generator.decoder."


def depth(keys: Iterable[str], prefix: str) -> int:
    """How many blocks a stack has: 1 + the largest index under `prefix` (0 when there is none); a
    missing block in between is then named by the layout check, not silently counted away."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return max((int(m.group(1)) + 1 for key in keys if (m := pattern.match(key))), default=0)


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
        return depth(self.state_dict, prefix)

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
        lambda s: original_heads(s(key, dim)),
        lambda v: original_heads(getattr(v.arch, width)),
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
           VISION_BLOCKS, lambda v: v.arch.vision_layers),
    _heads("vision_heads", "vision_heads", "vision_config.num_attention_heads", "visual.conv1.weight", 0,
           "vision_width"),
    _dim("vision_mlp", None, ("vision_config.intermediate_size",),
         VISION_BLOCKS + "0.mlp.c_fc.weight", 0, lambda v: 4 * v.arch.vision_width),
    _depth("text_layers", "transformer_layers", "text_config.num_hidden_layers", TEXT_BLOCKS,
           lambda v: v.arch.text_layers),
    _dim("text_width", "transformer_width", ("text_config.hidden_size",), "text_projection", 0,
         lambda v: v.arch.embed_dim),
    _heads("text_heads", "transformer_heads", "text_config.num_attention_heads", "text_projection", 0,
           "embed_dim"),
    _dim("text_mlp", None, ("text_config.intermediate_size",), TEXT_BLOCKS + "0.mlp.c_fc.weight", 0,
         lambda v: 4 * v.arch.embed_dim),
    _dim("vocab_size", "vocab_size", ("text_config.vocab_size",), "token_embedding.weight", 0,
         lambda v: VOCAB_SIZE),
    _dim("context_length", "context_length", ("text_config.max_position_embeddings",), "positional_embedding",
         0, lambda v: CONTEXT_LENGTH),
    _depth("mit_layers", "mit_layers", "vision_config.mit_num_hidden_layers", MIT_BLOCKS,
           lambda v: MIT_LAYERS),
    _heads("mit_heads", "mit_heads", "vision_config.mit_num_attention_heads", "text_projection", 1,
           "embed_dim"),
    _dim("mit_mlp", "mit_mlp_width", ("vision_config.mit_intermediate_size",),
         MIT_BLOCKS + "0.mlp.c_fc.weight", 0, lambda v: 4 * v.arch.embed_dim),
    _depth("prompt_layers", "prompts_layers", "prompt_layers", PROMPT_BLOCKS,
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


# The largest value each size may take: far above every published X-CLIP (the largest is L/14 at
# 336 px, width 1024, 24 layers; B/16 with 32 frames), so only a typo or a hostile file reaches them,
# and below where shapes, inputs or storage sizes would overflow or allocate without bound.
MAX_IMAGE_SIZE = 1024
LIMITS: dict[str, int] = {
    "embed_dim": 16384, "image_size": MAX_IMAGE_SIZE, "patch_size": MAX_IMAGE_SIZE, "frames": 128,
    "vision_width": 16384, "vision_layers": 256, "vision_heads": 1024, "vision_mlp": 65536,
    "text_width": 16384, "text_layers": 256, "text_heads": 1024, "text_mlp": 65536,
    "vocab_size": 1 << 20, "context_length": 4096,
    "mit_layers": 256, "mit_heads": 1024, "mit_mlp": 65536, "prompt_layers": 256, "prompt_heads": 1024,
}  # fmt: skip
MAX_CHANNELS = 64
# The other XCLIPConfig fields building the model reads, by kind (paths as in FIELDS).
ACTIVATIONS = ("text_config.hidden_act", "vision_config.hidden_act", "prompt_hidden_act")
EPSILONS = ("text_config.layer_norm_eps", "vision_config.layer_norm_eps")
PROBABILITIES = (
    "text_config.attention_dropout", "vision_config.attention_dropout", "vision_config.drop_path_rate",
    "prompt_attention_dropout", "prompt_projection_dropout",
)  # fmt: skip
FINITE = (
    "logit_scale_init_value", "prompt_alpha", "initializer_factor", "text_config.initializer_range",
    "text_config.initializer_factor", "vision_config.initializer_range", "vision_config.initializer_factor",
)  # fmt: skip


def config_source(config: object) -> str:
    """How messages name a config: `--config PATH` for a file, else "the config"."""
    return f"--config {escape(str(config))}" if isinstance(config, str | Path) else "the config"


def load_config_file(path: str | Path, *, where: str | None = None) -> XCLIPConfig:
    """Read and validate an XCLIPConfig JSON as `save_pretrained` writes it, field by field; errors
    start with `where` (default: "--config PATH"). Read with `converter.reader`'s bounds."""
    from transformers import XCLIPConfig

    where = where or config_source(path)
    data = read_json_object(Path(path), where, CONFIG_LIMIT)
    check_config_values(data, where)
    try:
        config = XCLIPConfig.from_dict(data)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; the message is what matters
        raise ConverterError(
            f"{where}: transformers cannot build an XCLIPConfig from it ({reason(err)})"
        ) from None
    hyper = hyper_from_config(config)
    for family, width_field, heads_field in HEAD_FAMILIES:
        width, heads = getattr(hyper, width_field), getattr(hyper, heads_field)
        if width % heads:
            raise ConverterError(f"{where}: {heads} {family} heads do not divide the width {width}")
    for f in FIELDS:
        values = {path_: _get(config, path_) for path_ in f.config_paths}
        if len(set(values.values())) > 1:
            raise ConverterError(f"{where}: {' and '.join(f'{k} {v}' for k, v in values.items())} must agree")
    if hyper.patch_size > hyper.image_size:
        raise ConverterError(
            f"{where}: vision_config.patch_size {hyper.patch_size} is larger than vision_config.image_size "
            f"{hyper.image_size}: not one patch fits"
        )
    return config


def check_config_values(data: Mapping[str, Any], where: str) -> None:
    """Every XCLIPConfig field the converter reads, checked by type and range in the JSON as given
    (absent fields take transformers' defaults); one line naming the first wrong field."""
    from transformers.activations import ACT2FN

    if data.get("model_type") != "xclip":
        raise ConverterError(f'{where}: expected an XCLIPConfig JSON ("model_type": "xclip")')
    for section in ("text_config", "vision_config"):
        if section in data and not isinstance(data[section], dict):
            raise ConverterError(
                f"{where}: {section} must be an object, found {type(data[section]).__name__}"
            )

    def values(paths: Iterable[str]) -> Iterator[tuple[str, Any]]:
        for path in paths:
            *section, name = path.split(".")
            value = (data.get(section[0], {}) if section else data).get(name)
            if value is not None:
                yield path, value

    def refuse(name: str, want: str, value: object) -> ConverterError:
        return ConverterError(f"{where}: {name} must be {want}, found {shown(value)}")

    for f in FIELDS:
        for name, value in values(f.config_paths):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise refuse(name, "a positive integer", value)
            if value > LIMITS[f.name]:
                raise refuse(
                    name, f"at most {LIMITS[f.name]:,}, far above any X-CLIP's (fix the file)", value
                )
    for name, value in values(["vision_config.num_channels"]):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CHANNELS:
            raise refuse(name, f"a positive integer of at most {MAX_CHANNELS} (3 for RGB)", value)
    for name, value in values(ACTIVATIONS):
        if not isinstance(value, str) or value not in ACT2FN:
            raise refuse(name, "an activation transformers knows (the original uses quick_gelu)", value)
    for name, value in values(EPSILONS):
        if not finite_number(value) or not 0 < value < 1:
            raise refuse(name, "a number between 0 and 1 (the original uses 1e-05)", value)
    for name, value in values(PROBABILITIES):
        if not finite_number(value) or not 0 <= value <= 1:
            raise refuse(name, "a probability from 0 to 1", value)
    for name, value in values(FINITE):
        if not finite_number(value):
            raise refuse(name, "a finite number", value)


# Where an XCLIPModel keeps the two tensors whose shapes say what image_size and num_channels must be.
POSITION_EMBEDDING = "vision_model.embeddings.position_embedding.weight"
PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding.weight"


def check_fits_weights(config: XCLIPConfig, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """The config fields no weight shape shows, against the weights (XCLIPModel keys).

    `check_state_dict` compares every shape the config implies, but image_size only through its
    patch grid — at patch 32, image sizes 224 and 240 both give 7×7, and a processor cropping 240
    changes every output — and the patch embedding's input channels are not a config shape at all.
    """
    vision = config.vision_config
    positions = state_dict.get(POSITION_EMBEDDING)
    if positions is not None and positions.ndim == 2:
        grid = math.isqrt(max(positions.shape[0] - 1, 0))
        if grid * grid == positions.shape[0] - 1 and vision.image_size != vision.patch_size * grid:
            raise ConverterError(
                f"{where}: vision_config.image_size {vision.image_size} is not vision_config.patch_size "
                f"{vision.patch_size} × the {grid}×{grid} patch grid of the weights' position embedding: "
                f"set image_size to {vision.patch_size * grid}"
            )
    patches = state_dict.get(PATCH_EMBEDDING)
    if patches is not None and patches.ndim == 4 and patches.shape[1] != vision.num_channels:
        raise ConverterError(
            f"{where}: vision_config.num_channels {vision.num_channels} does not match the "
            f"{patches.shape[1]} input channels of the weights' patch embedding (conv1): "
            f"set num_channels to {patches.shape[1]}"
        )


def check_variant(hyper: Hyper, variant: Variant, source: str) -> None:
    """A file for the wrong model is caught here, before anything is built."""
    diffs = hyper.differences(hyper_for_variant(variant))
    if diffs:
        raise ConverterError(
            f"{source} does not look like {variant.name} "
            f"(checkpoint vs registry): {'; '.join(diffs)}. Check --model-name, or omit it to convert "
            "the checkpoint as it is"
        )
