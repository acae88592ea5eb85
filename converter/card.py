"""The model card (README.md) of a converted folder: hub metadata written by huggingface_hub's
ModelCardData and parsed back by its ModelCard, provenance, verification, preprocessing, config, an
install line and a usage snippet that runs unchanged on transformers 4.40 .. 5.x, and the paper to cite."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from importlib import resources
from pathlib import PurePath
from string import Template
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from huggingface_hub import ModelCard, ModelCardData

from converter import DEFAULT_TEXTS, processing
from converter.config import Hyper
from converter.errors import escape
from converter.paths import local_path
from converter.registry import VARIANTS, Variant

if TYPE_CHECKING:
    from converter.verify import Verification

PLACEHOLDER = "path/to/this/folder"  # where the snippet loads from when no hub repo id is known
INSTALL = 'pip install "transformers>=4.40" torch pillow numpy'
# The CLIP checkpoint each X-CLIP backbone was initialised from (the hub's `base_model`), by
# (patch size, vision width, image size).
CLIP_BASES = {
    (32, 768, 224): "openai/clip-vit-base-patch32",
    (16, 768, 224): "openai/clip-vit-base-patch16",
    (14, 1024, 224): "openai/clip-vit-large-patch14",
    (14, 1024, 336): "openai/clip-vit-large-patch14-336",
}


def model_card(
    *,
    name: str,
    hyper: Hyper,
    source: str,
    sha256: str | None,
    verification: Verification | None,
    repo_id: str | None = None,
    dtype: str = "float32",
    float32_distance: Mapping[str, float] | None = None,
) -> str:
    """README.md for the output folder. `source` is recorded as `recorded_source` has it (never a local
    directory); `verification` is the mapping check on the weights as written; for a reduced `dtype`,
    `float32_distance` is the max |Δ| per output from the float32 original (reported, not gated)."""
    source, how = recorded_source(source, VARIANTS.get(name))
    base = CLIP_BASES.get((hyper.patch_size, hyper.vision_width, hyper.image_size))
    # No `pipeline_tag`: no transformers pipeline takes an XCLIPModel (tests/test_card.py checks). No
    # `datasets`: Kinetics, HMDB-51 and UCF-101 have no canonical hub dataset; the text names them.
    metadata = ModelCardData(
        license="mit",
        library_name="transformers",
        language=["en"],
        tags=["vision", "video", "x-clip"],
        base_model=base,
        base_model_relation="finetune" if base else None,
        converted_from={"source": source, "sha256": sha256},  # the exact file, which base_model cannot say
        architectures=["XCLIPModel"],
    )
    text = data_template("model_card.md").substitute(
        metadata=metadata.to_yaml(original_order=["license"]),  # first: the hub and tests read line one
        name=escape(name),  # a file's name: a newline in it must not add lines to a published card
        trained_on=_trained_on(name),
        source=escape(f"{source} ({how})" if how else source),
        sha256=sha256 or "not computed (a local file; `xclip-convert --sha256 HEX` pins and records it)",
        dtype=dtype,
        verification=_verification(verification, dtype, float32_distance),
        preprocessing=_preprocessing(hyper.image_size),
        install=INSTALL,
        usage=usage_snippet(repo_id or PLACEHOLDER, hyper.frames),
        config_rows="\n".join(f"| {k} | {v} |" for k, v in asdict(hyper).items()),
    )
    return str(ModelCard(text))  # parsed back as the hub parses it: the metadata is valid


def usage_snippet(load_from: str, frames: int) -> str:
    """The card's Python usage example (ends with a newline), from data/usage.py.template."""
    texts = ", ".join(f'"{t}"' for t in DEFAULT_TEXTS)
    return data_template("usage.py.template").substitute(load_from=load_from, frames=frames, texts=texts)


def public_source(source: str) -> str:
    """What a published card may say about the source: an http(s) URL without credentials or query
    string, otherwise (a local path or a file:// URL) the file name only."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https") and parts.hostname:
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}{parts.path}"  # no user:password@
    return PurePath(str(local_path(source) or source).replace("\\", "/")).name or source


def recorded_source(source: str, variant: Variant | None) -> tuple[str, str]:
    """The source a card records, and how the file was had when that is not the source itself: a
    published variant's file from any other URL (a mirror set with XCLIP_RELEASE_URL) is recorded as
    the authors' release, "fetched through a mirror", since a mirror's host is a private detail."""
    public = public_source(source)  # an http(s) URL, or a file name alone
    # A URL of any scheme (a file:// mirror too) that ends in the variant's release file name.
    mirrored = variant is not None and urlsplit(source).path.endswith(f"/{variant.source.filename}")
    if "://" not in source or not mirrored:
        return public, ""
    release = variant.source.published_url
    return (public, "") if public == release else (release, "fetched through a mirror")


def _trained_on(name: str) -> str:
    if name not in VARIANTS:  # a user's own checkpoint: its name says nothing true about its data
        return ""
    if "zero-shot" in name:
        text = "Trained on Kinetics-400; for zero-shot recognition (HMDB-51, UCF-101, Kinetics-600)."
    elif "-shot" in name:
        text = f"Trained {name.rsplit('-', 2)[-2]}-shot on {'HMDB-51' if 'hmdb' in name else 'UCF-101'}."
    else:
        text = f"Trained on Kinetics-{600 if 'kinetics-600' in name else 400}."
    return f"\n{text}\n"


def _verification(
    verification: Verification | None, dtype: str, float32_distance: Mapping[str, float] | None
) -> str:
    if verification is None:
        return "Not verified (converted with `--no-verify`)."
    rows = "".join(
        f"\n| {k} | {v:.2e} | {verification.tolerances[k]:.2e} |"
        for k, v in verification.max_abs_diff.items()
    )
    worst = "every site agrees exactly"
    if verification.margin:
        worst = f"the worst, `{verification.worst}`, at {verification.margin:.2g}× its tolerance"
    if divergence := verification.divergence():
        worst += f"; {divergence}"
    text = (
        "The converted `XCLIPModel` was compared with an independent implementation of the original "
        f"X-CLIP forward pass on seeded inputs, with the weights as written ({dtype}), at "
        f"{len(verification.compared)} sites: every layer of every stack in forward order, and the outputs "
        f"below; tolerance `--atol {verification.atol:g}` times each site's largest magnitude; "
        f"{'passed' if verification.passed else 'FAILED'}, {worst}:\n\n"
        f"| output | max abs difference | tolerance |\n|---|---|---|{rows}"
    )
    if dtype == "float32":
        return text
    rows = "".join(f"\n| {k} | {v:.2e} |" for k, v in (float32_distance or {}).items())
    distance = (
        f"\n\n| output | max abs difference from float32 |\n|---|---|{rows}" if rows else " not measured."
    )
    return (
        f"{text}\n\nThat check proves the mapping. Storing the weights in {dtype} also moves the outputs "
        f"away from the float32 original; that distance is reported here, not gated:{distance}"
    )


def _preprocessing(image_size: int) -> str:
    text = (
        f"The saved image processor resizes the short side to {processing.resize_short_side(image_size)} px "
        f"(bilinear), centre-crops {image_size} px and normalises with ImageNet mean/std, as the original "
        "does, but resizes with Pillow (antialiased) where the original uses OpenCV."
    )
    if image_size not in processing.PROCESSOR_DEVIATION:
        return f"{text} Its difference from the original's own pipeline was not measured at {image_size} px."
    mean, largest = processing.PROCESSOR_DEVIATION[image_size]
    return (
        f"{text} On real photos, after normalisation, the largest per-frame mean |Δ| is {mean:.3g} and "
        f"the largest |Δ| {largest:.3g} at {image_size} px (one uint8 level is about 0.0175)."
    )


def data_template(name: str) -> Template:
    """A text template in converter/data: a card's prose or its usage snippet, as a reader sees them."""
    return Template((resources.files("converter") / "data" / name).read_text(encoding="utf-8"))
