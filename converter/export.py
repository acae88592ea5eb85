"""Write the converted folder atomically: stage everything in a sibling temporary folder, then
rename it into place, so a failed or refused conversion never leaves a half-written output."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter.errors import ConverterError

if TYPE_CHECKING:
    from transformers import XCLIPConfig

WEIGHTS_NAME = "model.safetensors"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace a non-empty folder without --overwrite."""
    if output.exists() and not output.is_dir():
        raise ConverterError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConverterError(f"--output {output} exists and is not empty; pass --overwrite to replace it")


def write_model_files(folder: Path, config: XCLIPConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """config.json + model.safetensors, as `XCLIPModel.from_pretrained` reads them."""
    from safetensors.torch import save_file

    config.save_pretrained(folder)
    # safetensors writes from the tensors' memory; only the two transposed views need packing.
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, folder / WEIGHTS_NAME, metadata={"format": "pt"}
    )


def write_atomically(output: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run `write(staging_folder)`, then move the staging folder to `output`."""
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        write(staging)
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
