"""The model card (README.md) of a converted folder: front matter, provenance, config, verification, usage."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from converter.config import Hyper

if TYPE_CHECKING:
    from converter.verify import Verification


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
