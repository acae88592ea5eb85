"""The processor files of a converted folder (image processor + CLIP tokenizer), laid out so that every
supported transformers (4.40 through 5.x) loads them with `AutoProcessor` / `AutoTokenizer`, offline.

transformers 5 saves a processor as one nested `processor_config.json` and a `tokenizer.json` whose
merges are pairs. Older releases read neither: 4.40-4.50 look for `preprocessor_config.json` (and pass
a nested `processor_config.json`'s keys to `__init__` twice), tokenizers < 0.20 reads merges only as
"a b" strings, and the slow tokenizer needs `vocab.json` + `merges.txt`. `portable_layout` rewrites a
transformers 5 save into files all of them read; 5.x reads them too, to the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from converter.errors import ConverterError

PROCESSOR_CLASS = "XCLIPProcessor"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# The slow CLIPTokenizer skips the first line of merges.txt, as in OpenAI's and the hub's files.
MERGES_HEADER = "#version: 0.2"


def write_processor(folder: Path, image_size: int) -> None:
    """The XCLIPProcessor (original preprocessing + CLIP tokenizer), for AutoProcessor.from_pretrained.

    Importing transformers' processor classes costs more than the rest of a conversion, so the
    files are built once per (image size, transformers, processing code) and copied from the cache.
    """
    try:
        source = _cached_processor(image_size)
    except (OSError, ConverterError):  # no usable cache (a local conversion needs none): build in place
        build_processor_files(folder, image_size)
        return
    for file in source.iterdir():
        shutil.copyfile(file, folder / file.name)


def build_processor_files(folder: Path, image_size: int) -> None:
    """Save `converter.processing.build_processor(image_size)` to `folder` in the portable layout."""
    from converter.processing import build_processor

    build_processor(image_size).save_pretrained(folder)
    portable_layout(folder)


def portable_layout(folder: Path) -> None:
    """Rewrite the processor files transformers 5 saved in `folder` so that 4.40 .. 5.x all read them.

    - `preprocessor_config.json`: the image processor's own dict plus `"processor_class"` (flat).
    - `processor_config.json`: reduced to `{"processor_class": ...}`.
    - `tokenizer.json`: BPE merges as "a b" strings (no CLIP token contains a space).
    - `vocab.json` + `merges.txt` beside it, for the slow tokenizer (`use_fast=False`).
    """
    nested = _read_json(folder / PROCESSOR_FILE) if (folder / PROCESSOR_FILE).is_file() else {}
    image = nested.pop("image_processor", None)
    if image is None and (folder / IMAGE_PROCESSOR_FILE).is_file():
        image = _read_json(folder / IMAGE_PROCESSOR_FILE)
    nested.pop("processor_class", None)
    if image is None or nested:
        # Another sub-processor or processor attribute would be lost (or break 4.x): say so loudly.
        raise ConverterError(
            f"unexpected processor layout in {folder} (image processor: {image is not None}, other "
            f"entries: {sorted(nested)}): this transformers version saves XCLIPProcessor differently; "
            f"report it with the version."
        )
    _write_json(folder / IMAGE_PROCESSOR_FILE, {**image, "processor_class": PROCESSOR_CLASS})
    _write_json(folder / PROCESSOR_FILE, {"processor_class": PROCESSOR_CLASS})

    tokenizer = _read_json(folder / TOKENIZER_FILE)
    model = tokenizer["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    if any(len(m) != 2 or any(" " in part for part in m) for m in merges):
        raise ConverterError(
            f"{folder / TOKENIZER_FILE}: a BPE merge is not two space-free tokens, so it cannot be "
            f'written as "a b"; report it with the transformers version.'
        )
    model["merges"] = [" ".join(m) for m in merges]
    _write_json(folder / TOKENIZER_FILE, tokenizer)
    _write_json(folder / VOCAB_FILE, model["vocab"])
    (folder / MERGES_FILE).write_text(
        "\n".join([MERGES_HEADER, *model["merges"]]) + "\n", encoding="utf-8", newline="\n"
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n")


def _cached_processor(image_size: int) -> Path:
    from importlib.metadata import version

    from filelock import FileLock

    from converter import frames, processing, tokenizer
    from converter.fetch import cache_folder

    code = hashlib.sha256()
    # The files change when any module that decides their content does.
    for module in (processing.__file__, frames.__file__, tokenizer.__file__, __file__):
        code.update(Path(module).read_bytes())
    key = f"{image_size}-transformers{version('transformers')}-{code.hexdigest()[:12]}"
    folder = cache_folder("processor") / key
    if (folder / IMAGE_PROCESSOR_FILE).is_file():
        return folder
    with FileLock(str(folder) + ".lock"):
        if not (folder / IMAGE_PROCESSOR_FILE).is_file():
            from converter.export import staged_output

            with staged_output(folder, overwrite=True, flag="the processor cache") as staging:
                build_processor_files(staging, image_size)
    return folder
