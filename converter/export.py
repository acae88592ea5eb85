"""Write the converted folder atomically: stage everything in a sibling temporary folder, then
rename it into place, so a failed or refused conversion never leaves a half-written output."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter.config import Hyper
from converter.errors import ConverterError

if TYPE_CHECKING:
    from converter.verify import Verification

WEIGHTS_NAME = "model.safetensors"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace a non-empty folder without --overwrite."""
    if output.exists() and not output.is_dir():
        raise ConverterError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConverterError(f"--output {output} exists and is not empty; pass --overwrite to replace it")


def write_weights(folder: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """model.safetensors, as `XCLIPModel.from_pretrained` reads it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = folder / WEIGHTS_NAME
    try:
        # safetensors writes from the tensors' memory; only the two transposed views need packing.
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:
        raise ConverterError(f"could not write {path}: {err}") from err


@contextmanager
def weights_written_meanwhile(folder: Path, state_dict: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Write model.safetensors on a second thread while the block runs, and wait for it at the end.

    Conversion is I/O-bound and safetensors' writer releases the GIL, so the write overlaps with
    importing transformers, verifying and writing the small files. If the block raises, that error
    wins (the writer is still waited for, so nothing writes into a folder being removed).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-weights") as pool:
        written = pool.submit(write_weights, folder, state_dict)
        yield
    written.result()


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder beside `output`, moved into place when the block succeeds and removed when
    it fails, so a failed or refused conversion never leaves a half-written output."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        if output.exists():
            retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
            output.rename(retired)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_processor(folder: Path, image_size: int) -> None:
    """The XCLIPProcessor (original preprocessing + CLIP tokenizer), for AutoProcessor.from_pretrained.

    Importing transformers' processor classes costs more than the rest of a conversion, so the
    files are built once per (image size, transformers, processing code) and copied from the cache.
    """
    try:
        source = _cached_processor(image_size)
    except OSError:  # no writable cache: build in place
        from converter.processing import build_processor

        build_processor(image_size).save_pretrained(folder)
        return
    for file in source.iterdir():
        shutil.copyfile(file, folder / file.name)


def _cached_processor(image_size: int) -> Path:
    import hashlib
    from importlib.metadata import version

    from filelock import FileLock

    from converter import processing
    from converter.fetch import cache_dir

    code = hashlib.sha256(Path(processing.__file__).read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "processor" / f"{image_size}-transformers{version('transformers')}-{code}"
    if (folder / "processor_config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "processor_config.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
            processing.build_processor(image_size).save_pretrained(staging)
            staging.rename(folder)
    return folder


def model_card(
    *,
    name: str,
    hyper: Hyper,
    source: str,
    sha256: str | None,
    verification: Verification | None,
    repo_id: str | None = None,
) -> str:
    """README.md for the output folder: front matter, provenance, config, verification, usage."""
    if verification is None:
        checked = "Not verified (converted with `--no-verify`)."
    else:
        rows = "\n".join(f"| {k} | {v:.2e} |" for k, v in verification.max_abs_diff.items())
        checked = (
            "Compared with an independent implementation of the original X-CLIP forward pass on seeded "
            f"inputs (atol {verification.atol:g}):\n\n| output | max abs difference |\n|---|---|\n{rows}"
        )
    config_rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(hyper).items())
    load_from = repo_id or "path/to/this/folder"
    return f"""---
license: mit
library_name: transformers
pipeline_tag: video-classification
tags:
- vision
- video-classification
- x-clip
---

# {name}

X-CLIP ("Expanding Language-Image Pretrained Models for General Video Recognition", ECCV 2022),
converted from the original checkpoint of microsoft/VideoX to transformers' `XCLIPModel` by
xclip-converter.

- Source: {source}
- Source sha256: {sha256 or "not computed (a local file; `xclip-convert --sha256 HEX` pins and records it)"}

## Verification

{checked}

## Configuration

| field | value |
|---|---|
{config_rows}

## Usage

```python
import numpy as np
import torch
from transformers import AutoProcessor, XCLIPModel

processor = AutoProcessor.from_pretrained("{load_from}")
model = XCLIPModel.from_pretrained("{load_from}").eval()
video = list(np.load("clip.npy"))  # {hyper.frames} frames, H x W x 3, uint8
inputs = processor(text=["playing sports", "eating spaghetti", "go shopping"], videos=video,
                   return_tensors="pt", padding=True)
with torch.no_grad():
    probs = model(**inputs).logits_per_video.softmax(dim=1)
```
"""
