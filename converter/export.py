"""Write the converted folder atomically: stage everything in a sibling temporary folder, then
rename it into place, so a failed or refused conversion never leaves a half-written output."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from converter.errors import ConverterError

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
