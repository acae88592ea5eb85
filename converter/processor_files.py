"""The processor files of a converted folder (image processor + CLIP tokenizer), for
`AutoProcessor.from_pretrained`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


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
