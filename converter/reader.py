"""Read a small input file (a config, a processor or tokenizer file, a shard index) within bounds: regular
files only (checked before and after opening, so a FIFO swapped in is never read), a size cap per kind of
file, bounded JSON depth and integers. Every refusal is one line starting with `what`, the file's name.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from converter.errors import ConverterError, escape, reason
from converter.paths import check_utf8, kind_of

MiB = 1 << 20
# The caps hold the largest real file of each kind many times over; a file above them is not one.
CONFIG_LIMIT = 4 * MiB  # config.json, --config, preprocessor/processor/tokenizer_config.json: ≈ 5 KB real
INDEX_LIMIT = 16 * MiB  # model.safetensors.index.json: ≈ 100 bytes a tensor, ≈ 60 KB for L/14
TOKENIZER_LIMIT = 64 * MiB  # tokenizer.json ≈ 2.2 MB for CLIP, vocab.json ≈ 0.9 MB, merges.txt ≈ 0.5 MB
MAX_DEPTH = 64  # a config is 3 levels deep, tokenizer.json 5
MAX_INT_DIGITS = 19  # a signed 64-bit integer: no size, id or count in these files needs more
_HTML_START = re.compile(  # after an optional UTF-8 byte order mark
    rb"(\xef\xbb\xbf)?\s*<(!doctype\s+html|html|head|body|\?xml|!--|script|title|meta)", re.I
)


def file_format(head: bytes) -> str | None:
    """What a file's first bytes show: "html" (a web page in a checkpoint's place), "zip" (torch.save's
    format since torch 1.6), "safetensors", "pickle" (torch's legacy format), or None."""
    if _HTML_START.match(head):
        return "html"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    return "pickle" if head.startswith(b"\x80") else None


def check_regular(path: Path | int, what: str) -> os.stat_result:
    """The stat of `path` (links followed; or of an open descriptor) if it is a regular file; else one line
    saying what it is."""
    check_utf8(path, what)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConverterError(f"{what}: no such file") from None
    except OSError as err:
        raise ConverterError(f"{what}: cannot read it ({err.strerror or reason(err)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConverterError(f"{what} is a folder: give the file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise ConverterError(f"{what} is {kind_of(info.st_mode)}, not a regular file: give a file")
    return info


def read_bytes(path: Path, what: str, limit: int) -> bytes:
    """The whole file, refused unread unless a regular file of at most `limit` bytes."""
    check_regular(path, what)  # before opening: a device or a FIFO is never opened
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC), "rb") as file:
            # What was opened, should the path have changed since.
            _refuse_above(check_regular(file.fileno(), what).st_size, what, limit)
            data = file.read(limit + 1)  # one byte more tells a file that grew while being read
    except OSError as err:
        raise ConverterError(f"{what}: cannot read it ({err.strerror or reason(err)})") from None
    _refuse_above(len(data), what, limit)
    return data


def _refuse_above(size: int, what: str, limit: int) -> None:
    if size > limit:
        raise ConverterError(
            f"{what} is {size:,} bytes, more than the {limit // MiB} MiB such a file may have: "
            "is it the right file?"
        )


def check_size(path: Path, what: str, limit: int) -> None:
    """A regular file of at most `limit` bytes, left unread (for files another library parses)."""
    _refuse_above(check_regular(path, what).st_size, what, limit)


def read_json(path: Path, what: str, limit: int = CONFIG_LIMIT) -> Any:
    """A JSON file's value, read with `read_bytes`' checks, at most MAX_DEPTH deep, integers bounded."""

    def bounded_int(text: str) -> int:
        if (digits := len(text.lstrip("-"))) > MAX_INT_DIGITS:
            raise ConverterError(
                f"{what}: an integer of {digits:,} digits (at most {MAX_INT_DIGITS}): not a real value"
            )
        return int(text)

    too_deep = ConverterError(f"{what}: JSON nested more than {MAX_DEPTH} levels deep: not a config file")
    data = read_bytes(path, what, limit)
    try:
        value = json.loads(data.decode("utf-8"), parse_int=bounded_int)
    except UnicodeDecodeError as err:
        raise ConverterError(f"{what}: not UTF-8 text ({reason(err)})") from None
    except RecursionError:  # deeper than the interpreter's stack: certainly deeper than MAX_DEPTH
        raise too_deep from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ConverterError(f"{what}: cannot read JSON ({reason(err)})") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise too_deep
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def read_json_object(path: Path, what: str, limit: int = CONFIG_LIMIT) -> dict[str, Any]:
    """`read_json`, refused unless the file holds a JSON object."""
    value = read_json(path, what, limit)
    if not isinstance(value, dict):
        names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
        found = "null" if value is None else names[type(value)]  # JSON's own name of the type
        raise ConverterError(f"{what}: expected a JSON object, found {found}")
    return value


def shown(value: object) -> str:
    """A value read from a file, for a message: on one short line, control characters escaped."""
    text = escape(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def positive_int(value: object, limit: float = math.inf) -> bool:
    """An integer (not a boolean) from 1 to `limit`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def finite_number(value: object) -> bool:
    """A JSON number (not a boolean) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
