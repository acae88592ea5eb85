"""The 18 published variants: registry configs and derived key layouts equal the inventory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converter.build import meta_model
from converter.config import FIELDS, check_heads, hyper_for_variant, hyper_from_config, infer_hyper, to_config
from converter.errors import ConverterError
from converter.registry import VARIANTS
from converter.rules import hf_shapes, original_shapes

INVENTORY = Path(__file__).parent / "data" / "inventory"


def inventory(name: str) -> dict:
    return json.loads((INVENTORY / f"{name}.json").read_text())


def test_inventory_covers_the_registry():
    assert sorted(p.stem for p in INVENTORY.glob("*.json")) == sorted(VARIANTS)
    assert len(VARIANTS) == 18


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registry_matches_inventory(name):
    inv = inventory(name)
    hyper = hyper_for_variant(VARIANTS[name])
    for field in FIELDS:
        if field.original_name is not None:
            assert getattr(hyper, field.name) == inv["hyperparameters"][field.original_name], field.name
    assert VARIANTS[name].arch.name == inv["hyperparameters"]["MODEL.ARCH"].removesuffix("@336px")

    # Keys and shapes derived from the registry config through the rule table.
    derived = {k: list(s) for k, s in original_shapes(hyper).items()}
    real = {k: v["shape"] for k, v in inv["state_dict"].items()}
    assert derived == real
    assert len(real) == inv["num_keys"]

    # Inference from the real layout gives the registry config back.
    meta = {k: torch.empty(v, device="meta") for k, v in real.items()}
    assert infer_hyper(meta) == hyper


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_round_trips_and_heads_match_attention_modules(name):
    hyper = hyper_for_variant(VARIANTS[name])
    config = to_config(hyper)
    assert hyper_from_config(config) == hyper
    modules = inventory(name)["attention_modules"]
    assert config.vision_config.mit_num_attention_heads == modules["mit.resblocks.0.attn"]["num_heads"]
    prompt = modules["prompts_generator.decoder.0.cross_attn"]["num_heads"]
    assert config.prompt_num_attention_heads == prompt


def test_heads_cannot_be_inferred_below_width_64():
    meta = {
        k: torch.empty(v["shape"], device="meta")
        for k, v in inventory("xclip-base-patch32")["state_dict"].items()
    }
    meta["text_projection"] = torch.empty(32, 32, device="meta")
    hyper = infer_hyper(meta)
    assert hyper.text_heads == 0
    with pytest.raises(ConverterError, match="--config"):
        check_heads(hyper)


def test_release_sources_are_unique():
    refs = [v.source.ref for v in VARIANTS.values()]
    names = [v.source.filename for v in VARIANTS.values()]
    assert len(set(refs)) == len(set(names)) == 18


def _layout_cases():
    from tests.helpers import SQUARE, UNEVEN

    yield from (pytest.param(hyper_for_variant(v), id=name) for name, v in VARIANTS.items())
    yield pytest.param(UNEVEN, id="uneven")
    yield pytest.param(SQUARE, id="square")


@pytest.mark.parametrize("hyper", list(_layout_cases()))
def test_layout_matches_transformers_model(hyper):
    """The shape table that checks conversions is exactly XCLIPModel's state dict."""
    model_shapes = {k: tuple(v.shape) for k, v in meta_model(to_config(hyper)).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in hf_shapes(hyper).items()} == model_shapes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_expected_fixtures_repeat_the_registry_faithfully(name):
    """expected/<model>.json repeats registry facts for the reader; they must not drift apart."""
    variant = VARIANTS[name]
    fixture = json.loads((Path(__file__).parent.parent / "expected" / f"{name}.json").read_text())
    assert fixture["model_name"] == name
    assert fixture["release_file"] == variant.source.filename
    assert fixture["release_source"] == variant.source.url()
    assert (fixture["frames"], fixture["image_size"]) == (variant.frames, variant.image_size)
