"""The processor files of a converted folder (image processor + CLIP tokenizer), in a layout that every
supported transformers (4.40 through 5.x) loads offline with `AutoProcessor` / `AutoTokenizer`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from converter.errors import ConverterError
from converter.reader import read_json_object

PROCESSOR_CLASS = "XCLIPProcessor"
LOCK_TIMEOUT = 60.0  # seconds to wait for another run building a cache entry (a stopped one holds it)
DIGESTS = "sha256.json"  # in a cache entry: its files' digests as built; one changed since is never copied
# What build_processor_files writes whatever else save_pretrained adds: a cache entry lacking one is rebuilt.
FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
)


def write_processor(folder: Path, image_size: int) -> None:
    """The XCLIPProcessor's files, built once per (image size, transformers, processing code) and copied
    from the cache: importing transformers' processor classes costs more than the rest of a conversion."""
    from importlib.metadata import version

    from filelock import FileLock, Timeout

    from converter.export import staged_output
    from converter.fetch import cache_folder

    # Keyed by the package's code as a whole: the files change when any module that decides them does.
    code = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        code.update(module.read_bytes())
    entry = f"{image_size}-transformers{version('transformers')}-{code.hexdigest()[:12]}"
    try:
        cached = cache_folder("processor") / entry
        if cached.is_symlink():  # not one we made: never replaced, wherever it points
            raise ConverterError(f"{cached} is a symlink")
        # One process builds it; the others wait, and each reads the files under the lock.
        with FileLock(f"{cached}.lock", timeout=LOCK_TIMEOUT):
            if (files := _intact(cached)) is None:  # a cache cleaner took some files, or one was changed
                with staged_output(cached, overwrite=True, flag="the processor cache") as staging:
                    build_processor_files(staging, image_size)
                    _write_json(staging / DIGESTS, files := _digests(staging))
            contents = {name: (cached / name).read_bytes() for name in files}
    # The cache is optional: whatever stops it (unwritable, busy, removed meanwhile: the tokenizers
    # library then raises a bare Exception) leaves the files to be built in place.
    except Exception as err:
        if isinstance(err, Timeout):
            logging.getLogger("converter").info("the processor cache is busy: building the files in place")
        build_processor_files(folder, image_size)
        return
    for name, data in contents.items():  # a full disk here names the output's file
        (folder / name).write_bytes(data)


def build_processor_files(folder: Path, image_size: int) -> None:
    """Save the XCLIPProcessor of `processing` to `folder` as every version reads it: the image processor
    flat in `preprocessor_config.json` (4.x passes `processor_config.json`'s keys to `__init__` twice),
    merges as "a b" strings, and `vocab.json` + `merges.txt` for the slow tokenizer."""
    from converter.processing import build_image_processor, build_tokenizer

    build_tokenizer().save_pretrained(folder)
    image = build_image_processor(image_size).to_dict()
    _write_json(folder / "preprocessor_config.json", {**image, "processor_class": PROCESSOR_CLASS})
    _write_json(folder / "processor_config.json", {"processor_class": PROCESSOR_CLASS})
    config = _read_json(folder / "tokenizer_config.json")
    _write_json(folder / "tokenizer_config.json", {**config, "processor_class": PROCESSOR_CLASS})

    tokenizer = _read_json(folder / "tokenizer.json")
    model = tokenizer["model"]
    # Pairs as "a b" strings, the form 4.x reads; no token holds a space (CLIP's merges file is "a b" lines).
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write_json(folder / "tokenizer.json", tokenizer)
    _write_json(folder / "vocab.json", model["vocab"])
    # The slow CLIPTokenizer skips the first line of merges.txt, as in OpenAI's and the hub's files.
    merges_txt = "\n".join(["#version: 0.2", *model["merges"]]) + "\n"
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8", newline="\n")


def _digests(folder: Path) -> dict[str, str]:
    """The sha256 of each processor file in `folder`: its own files only, never a stray weights file."""
    from converter.fetch import sha256_file
    from converter.published import TOKENIZER_FILES

    names = sorted({*FILES, *TOKENIZER_FILES})
    return {name: sha256_file(folder / name) for name in names if _regular(folder / name)}


def _intact(entry: Path) -> dict[str, str] | None:
    """A cache entry's digests when it holds every processor file as it was built, else None."""
    try:
        built = read_json_object(entry / DIGESTS, f"{entry / DIGESTS}")
    except (OSError, ConverterError):
        return None
    return built if set(FILES) <= set(built) and _digests(entry) == built else None


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8", newline="\n")
