"""Hyper-parameters of an X-CLIP model: read off an original state dict, given by the registry, or read
from an `XCLIPConfig` JSON (checked field by field) — and turned into transformers' `XCLIPConfig`.
`Hyper` is the common currency: a check against a variant names exactly the fields that disagree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import partial, reduce
from operator import ge
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from converter.clip import CONTEXT_LENGTH, HEAD_DIM, MIT_LAYERS, PROMPT_LAYERS, VOCAB_SIZE, original_heads
from converter.errors import ConverterError, escape, reason
from converter.reader import CONFIG_LIMIT, finite_number, positive_int, read_json_object, shown
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


def _kept(*config_paths: str, limit: int, **original_name: str | None) -> Any:
    """A `Hyper` field: its XCLIPConfig paths (the first is read, all are written), the largest value a config
    may give it (far above any X-CLIP, below where sizes overflow), and the original's name if it differs."""
    return field(metadata={"config_paths": config_paths, "limit": limit, **original_name})


@dataclass(frozen=True)
class Hyper:
    embed_dim: int = _kept("projection_dim", "vision_config.mit_hidden_size", limit=16384)
    image_size: int = _kept("vision_config.image_size", limit=1024, original_name="image_resolution")
    patch_size: int = _kept("vision_config.patch_size", limit=1024, original_name="vision_patch_size")
    frames: int = _kept("vision_config.num_frames", limit=128, original_name="DATA.NUM_FRAMES")
    vision_width: int = _kept("vision_config.hidden_size", limit=16384)
    vision_layers: int = _kept("vision_config.num_hidden_layers", limit=256)
    vision_heads: int = _kept("vision_config.num_attention_heads", limit=1024)
    vision_mlp: int = _kept("vision_config.intermediate_size", limit=65536, original_name=None)
    text_width: int = _kept("text_config.hidden_size", limit=16384, original_name="transformer_width")
    text_layers: int = _kept("text_config.num_hidden_layers", limit=256, original_name="transformer_layers")
    text_heads: int = _kept("text_config.num_attention_heads", limit=1024, original_name="transformer_heads")
    text_mlp: int = _kept("text_config.intermediate_size", limit=65536, original_name=None)
    vocab_size: int = _kept("text_config.vocab_size", limit=1 << 20)
    context_length: int = _kept("text_config.max_position_embeddings", limit=4096)
    mit_layers: int = _kept("vision_config.mit_num_hidden_layers", limit=256)
    mit_heads: int = _kept("vision_config.mit_num_attention_heads", limit=1024)
    mit_mlp: int = _kept("vision_config.mit_intermediate_size", limit=65536, original_name="mit_mlp_width")
    prompt_layers: int = _kept("prompt_layers", limit=256, original_name="prompts_layers")
    prompt_heads: int = _kept("prompt_num_attention_heads", limit=1024, original_name="prompts_heads")

    @property
    def vision_positions(self) -> int:
        """Patch positions plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def prompt_mlp(self) -> int:
        """The prompt generator's MLP width: 4 E, fixed in the original's code."""
        return 4 * self.embed_dim


class Field(NamedTuple):
    """A `Hyper` field with what `_kept` says of it."""

    name: str
    config_paths: tuple[str, ...]
    limit: int
    original_name: str | None


FIELDS = tuple(Field(**{"name": f.name, "original_name": f.name, **f.metadata}) for f in fields(Hyper))
LIMITS = {f.name: f.limit for f in FIELDS}

# (family, width field, heads field): each attention family's heads must divide its width.
HEAD_FAMILIES = (
    ("vision", "vision_width", "vision_heads"),
    ("text", "text_width", "text_heads"),
    ("MIT", "embed_dim", "mit_heads"),
    ("prompt", "embed_dim", "prompt_heads"),
)


def heads_off_rule(h: Hyper) -> list[tuple[str, int, int]]:
    """(XCLIPConfig path, stated heads, the original's width // 64) for each family `h` gives other heads."""
    paths = {f.name: f.config_paths[0] for f in FIELDS}  # where XCLIPConfig keeps each count
    return [
        (paths[heads], getattr(h, heads), original_heads(getattr(h, width)))
        for _, width, heads in HEAD_FAMILIES
        if getattr(h, heads) != original_heads(getattr(h, width))
    ]


def _with_original_heads(**sizes: int) -> Hyper:
    """`sizes` with every family's head count by the original's rule, width // 64."""
    return Hyper(**sizes, **{heads: original_heads(sizes[width]) for _, width, heads in HEAD_FAMILIES})


def hyper_for_variant(variant: Variant) -> Hyper:
    """A published variant: its backbone's sizes, and what the original's code fixes or derives."""
    arch, embed = variant.arch, variant.arch.embed_dim
    return _with_original_heads(
        embed_dim=embed,
        image_size=variant.image_size,
        patch_size=arch.patch_size,
        frames=variant.frames,
        vision_width=arch.vision_width,
        vision_layers=arch.vision_layers,
        vision_mlp=4 * arch.vision_width,
        text_width=embed,
        text_layers=arch.text_layers,
        text_mlp=4 * embed,
        vocab_size=VOCAB_SIZE,
        context_length=CONTEXT_LENGTH,
        mit_layers=MIT_LAYERS,
        mit_mlp=4 * embed,
        prompt_layers=PROMPT_LAYERS,
    )


# Where `infer_hyper` reads each size: (checkpoint key, dimension); and the stacks whose blocks it counts.
SHAPES = {
    "embed_dim": ("text_projection", 1),
    "text_width": ("text_projection", 0),
    "vision_width": ("visual.conv1.weight", 0),
    "patch_size": ("visual.conv1.weight", 2),
    "frames": ("mit.positional_embedding", 1),
    "vision_mlp": (VISION_BLOCKS + "0.mlp.c_fc.weight", 0),
    "text_mlp": (TEXT_BLOCKS + "0.mlp.c_fc.weight", 0),
    "vocab_size": ("token_embedding.weight", 0),
    "context_length": ("positional_embedding", 0),
    "mit_mlp": (MIT_BLOCKS + "0.mlp.c_fc.weight", 0),
}
STACKS = {
    "vision_layers": VISION_BLOCKS,
    "text_layers": TEXT_BLOCKS,
    "mit_layers": MIT_BLOCKS,
    "prompt_layers": PROMPT_BLOCKS,
}


def infer_hyper(state_dict: Mapping[str, torch.Tensor]) -> Hyper:
    """Read every hyper-parameter off an original state dict's keys and shapes, held to the rules a config
    is (head counts: width // 64, which `check_heads` refuses below width 64)."""

    def shape(key: str, dim: int) -> list[int]:
        if key not in state_dict:
            raise ConverterError(f"cannot infer the model: key {key!r} is missing from the checkpoint")
        shape = list(state_dict[key].shape)
        if len(shape) <= dim:
            raise ConverterError(f"cannot infer the model: {key!r} has shape {shape}, too few dims")
        return shape

    sizes = {name: shape(key, dim)[dim] for name, (key, dim) in SHAPES.items()}
    origins = {name: f"{key!r} has shape {shape(key, dim)}" for name, (key, dim) in SHAPES.items()}
    for name, prefix in STACKS.items():
        sizes[name] = depth(state_dict, prefix)
        origins[name] = f"the checkpoint has {sizes[name]} blocks '{prefix}<i>.'"
    positions = shape("visual.positional_embedding", 0)[0] - 1
    grid = math.isqrt(max(positions, 0))
    if grid * grid != positions or positions <= 0:
        raise ConverterError(
            f"visual.positional_embedding has {positions} patch positions, not a square grid"
        )
    sizes["image_size"] = grid * sizes["patch_size"]
    origins["image_size"] = (
        f"'visual.positional_embedding' has a {grid}×{grid} patch grid, {origins['patch_size']}"
    )
    for paths, allowed, want in VALUE_RULES:  # what a config giving these sizes would be held to
        for f in FIELDS:
            if f.name in sizes and f.config_paths[0] in paths and not allowed(sizes[f.name]):
                raise ConverterError(
                    f"cannot infer the model: {origins[f.name]}, so {f.config_paths[0]} would be "
                    f"{sizes[f.name]}; it must be {want}"
                )
    return _with_original_heads(**sizes)


def check_heads(h: Hyper) -> None:
    """Inferred heads are width // 64: below width 64 that is 0, and only a --config can say."""
    for family, width, heads in HEAD_FAMILIES:
        if getattr(h, heads) == 0:
            raise ConverterError(
                f"cannot infer the {family} head count: width {getattr(h, width)} is below {HEAD_DIM} "
                "(the original uses width // 64); pass --config with an XCLIPConfig JSON"
            )


def check_variant(hyper: Hyper, variant: Variant, source: str) -> None:
    """A file for the wrong model is caught here, before anything is built."""
    expected = asdict(hyper_for_variant(variant))
    diffs = [f"{k}: {v} vs {expected[k]}" for k, v in asdict(hyper).items() if v != expected[k]]
    if diffs:
        raise ConverterError(
            f"{source} does not look like {variant.name} (checkpoint vs registry): {'; '.join(diffs)}. "
            "Check --model-name, or omit it to convert the checkpoint as it is"
        )


def to_config(h: Hyper) -> XCLIPConfig:
    """transformers' XCLIPConfig (5.x constructors; `from_text_vision_configs` is gone)."""
    from transformers import XCLIPConfig

    values: dict[str, Any] = {"text_config": {}, "vision_config": {}}
    for f in FIELDS:
        for path in f.config_paths:
            *parent, leaf = path.split(".")
            (values[parent[0]] if parent else values)[leaf] = getattr(h, f.name)
    return XCLIPConfig(**values, architectures=["XCLIPModel"])


def hyper_from_config(config: XCLIPConfig) -> Hyper:
    return Hyper(**{f.name: _get(config, f.config_paths[0]) for f in FIELDS})


def _get(config: object, path: str) -> Any:
    return reduce(getattr, path.split("."), config)


def config_source(config: object) -> str:
    """How messages name a config: `--config PATH` for a file, else "the config"."""
    return f"--config {escape(str(config))}" if isinstance(config, str | Path) else "the config"


def load_config_file(path: str | Path, *, where: str | None = None) -> XCLIPConfig:
    """Read and validate an XCLIPConfig JSON as `save_pretrained` writes it, field by field, with
    `converter.reader`'s bounds; errors start with `where` (default: "--config PATH")."""
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


def _activation(value: object) -> bool:
    from transformers.activations import ACT2FN

    return isinstance(value, str) and value in ACT2FN


# The other XCLIPConfig fields building the model reads (paths as in FIELDS), by kind; the last two
# kinds matter only for training.
ACTIVATIONS = ("text_config.hidden_act", "vision_config.hidden_act", "prompt_hidden_act")
EPSILONS = ("text_config.layer_norm_eps", "vision_config.layer_norm_eps")
PROBABILITIES = (
    "text_config.attention_dropout",
    "vision_config.attention_dropout",
    "vision_config.drop_path_rate",
    "prompt_attention_dropout",
    "prompt_projection_dropout",
)
FINITE = (
    "logit_scale_init_value",
    "prompt_alpha",
    "initializer_factor",
    "text_config.initializer_range",
    "text_config.initializer_factor",
    "vision_config.initializer_range",
    "vision_config.initializer_factor",
)
# What each field the converter reads must be, as a message says it; the size checks run first, so the
# limits compare integers (partial(ge, limit) is: limit >= value).
VALUE_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    *((f.config_paths, positive_int, "a positive integer") for f in FIELDS),
    *((f.config_paths, partial(ge, f.limit), f"at most {f.limit:,}, far above any X-CLIP's") for f in FIELDS),
    (
        ("text_config.max_position_embeddings",),
        lambda v: v >= 2,
        "at least 2 (a text holds a start and an end token)",
    ),
    (
        ("vision_config.num_channels",),
        lambda v: positive_int(v, 64),
        "a positive integer of at most 64 (3 for RGB)",
    ),
    (ACTIVATIONS, _activation, "an activation transformers knows (the original uses quick_gelu)"),
    (
        EPSILONS,
        lambda v: finite_number(v) and 0 < v < 1,
        "a number between 0 and 1 (the original uses 1e-05)",
    ),
    (PROBABILITIES, lambda v: finite_number(v) and 0 <= v <= 1, "a probability from 0 to 1"),
    (FINITE, finite_number, "a finite number"),
)


# config.json keys with which from_pretrained loads something other than the weights as they are stored:
# quantized, through a repo's own code (AutoModel), another weights file, or with fused modules.
LOADING_KEYS = ("quantization_config", "auto_map", "transformers_weights", "fusion_config")


def loading_keys(config: XCLIPConfig) -> list[str]:
    return [key for key in LOADING_KEYS if getattr(config, key, None) is not None]


def check_config_values(data: Mapping[str, Any], where: str) -> None:
    """Every XCLIPConfig field the converter reads, checked by type and range in the JSON as given
    (absent fields take transformers' defaults); one line naming the first wrong field."""
    if data.get("model_type") != "xclip":
        raise ConverterError(f'{where}: expected an XCLIPConfig JSON ("model_type": "xclip")')
    for section in ("text_config", "vision_config"):
        if not isinstance(data.get(section, {}), dict):
            raise ConverterError(
                f"{where}: {section} must be an object, found {type(data[section]).__name__}"
            )
    for paths, allowed, want in VALUE_RULES:
        for path in paths:
            *section, name = path.split(".")
            value = (data.get(section[0], {}) if section else data).get(name)
            if value is not None and not allowed(value):
                raise ConverterError(f"{where}: {path} must be {want}, found {shown(value)}")


def check_fits_weights(config: XCLIPConfig, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """The config fields no weight shape shows, against weights `check_state_dict` passed: image_size beyond
    its patch grid (224 and 240 both give 7×7 at patch 32; a 240 crop changes all outputs), input channels."""
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    if vision.image_size != vision.patch_size * grid:
        raise ConverterError(
            f"{where}: vision_config.image_size {vision.image_size} is not vision_config.patch_size "
            f"{vision.patch_size} × the {grid}×{grid} patch grid of the weights' position embedding: "
            f"set image_size to {vision.patch_size * grid}"
        )
    channels = state_dict["vision_model.embeddings.patch_embedding.weight"].shape[1]
    if channels != vision.num_channels:
        raise ConverterError(
            f"{where}: vision_config.num_channels {vision.num_channels} does not match the "
            f"{channels} input channels of the weights' patch embedding (conv1): "
            f"set num_channels to {channels}"
        )
