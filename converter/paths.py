"""One path policy for every path the tool writes: never the current folder or what holds it, never
what a run reads or keeps (`protected`) nor inside it or around it, never a device or FIFO, and
nothing that exists (a non-empty folder, a file) without `overwrite`.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

from converter.errors import ConverterError, escape

# (label, path): something of the user's, or a cache, that no output may be, contain or lie inside.
Protected = tuple[str, Path]
Kind = Literal["folder", "file"]


def caches() -> list[Protected]:
    """Every cache the tool reads from: its own and huggingface_hub's."""
    from huggingface_hub import constants

    from converter.registry import cache_dir

    try:
        ours = [("the download cache", cache_dir())]
    except ConverterError:  # no home folder: no default cache exists to be written over
        ours = []
    return [*ours, ("the Hugging Face cache", Path(constants.HF_HUB_CACHE))]


def protected(
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    source: str | Path | None = None,
    source_label: str = "the source",
) -> list[Protected]:
    """What a run reads: its inputs that are local paths (a `file://` URL too) and every cache."""
    source = source if source is not None and Path(source).exists() else None
    given = [("--checkpoint", checkpoint), ("--config", config), (source_label, source)]
    return [(label, path) for label, value in given if (path := local_path(value)) is not None] + caches()


def local_path(value: str | Path | None) -> Path | None:
    """The local file a path or a file:// URL names; None for None, any other URL or a malformed one."""
    text = str(value)
    if text[:7].lower() == "file://":
        try:
            return Path(url2pathname(urlsplit(text).path))
        except ValueError:  # e.g. "file://[x/..." (fetch_url says why)
            return None
    return None if value is None or "://" in text else Path(value)


def check_target(
    path: str | Path,
    *,
    kind: Kind,
    overwrite: bool,
    protected: Iterable[Protected] = (),
    flag: str = "--output",
) -> Path:
    """Refuse `path` (what `flag` names) if the policy forbids writing it; return it resolved."""
    shown = escape(str(path))
    if kind == "file" and str(path).endswith(("/", os.sep)):  # Path() drops the slash, and writes a file
        raise ConverterError(f"{flag} {shown} names a folder: name the file")
    path = Path(path)
    if path.name in ("", ".", ".."):
        example = "xclip-model" if kind == "folder" else "model.pth"
        raise ConverterError(f"{flag} {shown}: name the {kind} to write, e.g. {flag} {shown}/{example}")
    if path.is_symlink() and not path.exists():
        raise ConverterError(f"{flag} {shown} is a broken symlink; remove it or choose another {kind}")
    if str(path.absolute()).startswith(("/dev/std", "/dev/fd/", "/proc/")):  # a stream, such as a log
        raise ConverterError(f"{flag} {shown} is a process's open file (a standard stream): name a file")
    target = _resolved(flag, path)
    check_utf8(target, f"{flag} {shown}")  # the staging beside it has its whole path
    if kind == "folder" and target in (cwd := _resolved(flag, Path.cwd()), *cwd.parents):
        raise ConverterError(
            f"{flag} {shown} is the current folder or holds it ({target}); choose a folder below it"
        )
    protected = list(protected)
    # Being an input is the first thing to say; then what is there; then what it holds or lies in.
    _refuse_protected(
        flag, path, target, [(label, p) for label, p in protected if _resolved(flag, p) == target]
    )
    existing = what_is_there(path)
    if existing not in (None, "a folder" if kind == "folder" else "a regular file"):
        what_to_do = (
            f", not a folder; choose another {flag}" if kind == "folder" else ": name a file to write"
        )
        raise ConverterError(f"{flag} {shown} is {existing}{what_to_do}")
    _refuse_protected(flag, path, target, protected)
    if existing is not None and _is_mount_point(target):  # found only when the output is moved in
        raise ConverterError(
            f"{flag} {shown} is a mount point, which cannot be replaced: "
            + ("name a folder inside it" if kind == "folder" else "name another file")
        )
    ancestor = next(p for p in target.parents if p.exists())  # the root at the latest
    if not ancestor.is_dir():
        raise ConverterError(f"{flag} {shown}: {ancestor} is a file, not a folder")
    if existing is None or overwrite:
        return target
    if kind == "file":
        raise ConverterError(f"{flag} {shown} exists; pass --overwrite to replace it")
    try:
        empty = not any(target.iterdir())
    except OSError as err:
        raise ConverterError(f"{flag} {shown}: cannot read it ({err.strerror})") from err
    if not empty:
        raise ConverterError(f"{flag} {shown} exists and is not empty; pass --overwrite to replace it")
    return target


def _is_mount_point(path: Path) -> bool:
    """A mount point, bind mounts within one file system included (which os.path.ismount misses)."""
    if os.path.ismount(path):
        return True
    try:  # field 5 of each line is a mount point, with space, tab, newline and backslash as octal escapes
        with open("/proc/self/mountinfo", "rb") as mounts:
            points = [line.split()[4] for line in mounts]
    except (OSError, IndexError):  # not Linux
        return False
    octal = re.compile(rb"\\([0-7]{3})")
    return os.fsencode(path) in {octal.sub(lambda m: bytes([int(m[1], 8)]), p) for p in points}


def check_utf8(path: str | Path | int, what: str) -> None:
    """Refuse a path that torch and safetensors would open under other bytes (a descriptor passes): they
    encode a name as UTF-8, the system as the locale says."""
    if isinstance(path, int):
        return
    try:
        same = str(path).encode("utf-8") == os.fsencode(path)
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
        same = False
    if same:
        return
    if (encoding := sys.getfilesystemencoding()).replace("-", "").lower() != "utf8":
        raise ConverterError(
            f"{what}: the locale's encoding ({encoding}) is not UTF-8, and torch and safetensors open names "
            "as UTF-8: run with PYTHONUTF8=1 (or LC_ALL=C.UTF-8)"
        )
    raise ConverterError(
        f"{what}: the path is not valid UTF-8, which torch and safetensors cannot open: use a UTF-8 name"
    )


def _refuse_protected(flag: str, path: Path, target: Path, protected: Iterable[Protected]) -> None:
    for label, given in protected:
        place = _resolved(flag, given)
        if place == target:
            relation = "is"
        elif target in place.parents:
            relation = "contains"
        elif place in target.parents:
            relation = "lies inside"
        else:
            continue
        raise ConverterError(
            f"{flag} {escape(str(path))} {relation} {label} {escape(str(given))}; choose another {flag}"
        )


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _resolved(flag: str, path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop, say
        raise ConverterError(
            f"{flag} {escape(str(path))}: cannot resolve the paths to compare ({err})"
        ) from err


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def what_is_there(path: Path) -> str | None:
    """What `path` is once links are followed (None: nothing); `stat` follows /dev/stdout to its pipe."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise ConverterError(f"{escape(str(path))}: cannot inspect it ({err.strerror})") from err
    return kind_of(mode)


def kind_of(mode: int) -> str:
    """What a stat mode is, with its article: "a folder", "a regular file", "a FIFO", ..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")
