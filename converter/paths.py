"""One path policy for every path the tool writes (`--output`, `--report`, caches, the suite's outputs).

`check_target` refuses a target that names no entry or (a folder) holds the current folder; that is,
holds or lies inside what the run reads or keeps (`protected`, symlinks resolved); that exists as
something other than what will be written (a device or FIFO is never opened or replaced); or that
exists (a non-empty folder, a file) without `overwrite`. `converter.export` proves the parent writable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from converter.errors import ConverterError, escape

# (label, path): something of the user's, or a cache, that no output may be, contain or lie inside.
Protected = tuple[str, Path]
Kind = Literal["folder", "file"]


def caches() -> list[Protected]:
    """Every cache the tool reads from: its own, and huggingface_hub's (the audited snapshots)."""
    from huggingface_hub import constants

    from converter.fetch import cache_dir

    return [("the download cache", cache_dir()), ("the Hugging Face cache", Path(constants.HF_HUB_CACHE))]


def protected(
    *,
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    video: str | Path | None = None,
    source: str | Path | None = None,
    source_label: str = "the source",
) -> list[Protected]:
    """What a run reads, as `check_target` protects it: the inputs that are local paths (a `file://`
    checkpoint too; hub ids and http URLs are not paths) and every cache. `source` is a folder read
    (an audited or converted-back model; a hub id is in the Hugging Face cache)."""
    source = source if source is not None and Path(source).exists() else None
    given = [("--checkpoint", checkpoint), ("--config", config), ("--video", video), (source_label, source)]
    return [(label, path) for label, value in given if (path := _local_path(value)) is not None] + caches()


def _local_path(value: str | Path | None) -> Path | None:
    """The local file a path or `file://` URL names; None for other URLs and None."""
    if value is None:
        return None
    text = str(value)
    if text.startswith("file://"):
        return Path(unquote(urlsplit(text).path))
    return None if "://" in text else Path(value)


def check_target(
    path: Path,
    *,
    kind: Kind,
    overwrite: bool,
    protected: Iterable[Protected] = (),
    flag: str = "--output",
) -> Path:
    """Refuse `path` (what `flag` names) if the policy above forbids writing it; return it resolved."""
    shown = escape(str(path))
    if path.name in ("", ".", ".."):
        example = "xclip-model" if kind == "folder" else "model.pth"
        raise ConverterError(f"{flag} {shown}: name the {kind} to write, e.g. {flag} {shown}/{example}")
    if path.is_symlink() and not path.exists():
        raise ConverterError(f"{flag} {shown} is a broken symlink; remove it or choose another {kind}")
    target = _resolved(flag, path)
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
        if kind == "folder":
            raise ConverterError(f"{flag} {shown} is {existing}, not a folder; choose another {flag}")
        name = "report.json" if flag.endswith("report") else "model.pth"
        example = f", e.g. {flag} {escape(str(path / name))}" if existing == "a folder" else ""
        raise ConverterError(f"{flag} {shown} is {existing}: name a file to write{example}")
    _refuse_protected(flag, path, target, protected)
    ancestor = next(p for p in target.parents if p.exists())  # the root at the latest
    if not ancestor.is_dir():
        raise ConverterError(f"{flag} {shown}: {ancestor} is a file, not a folder")
    if existing is None or overwrite:
        return target
    if kind == "file":
        raise ConverterError(f"{flag} {shown} exists; pass --overwrite to replace it")
    try:
        with os.scandir(target) as entries:
            empty = next(entries, None) is None
    except OSError as err:
        raise ConverterError(f"{flag} {shown}: cannot read it ({err.strerror})") from err
    if not empty:
        raise ConverterError(f"{flag} {shown} exists and is not empty; pass --overwrite to replace it")
    return target


def check_output(output: Path, overwrite: bool, protected: Iterable[Protected] = ()) -> Path:
    """`check_target` for an output folder (`--output`)."""
    return check_target(output, kind="folder", overwrite=overwrite, protected=protected)


def check_writable(flag: str, target: Path) -> None:
    """Refuse a target whose nearest existing folder cannot be written, for a writer entered only
    at the end of a long run (the test suite's outputs): the staging entry proves it otherwise."""
    folder = next((p for p in [target, *target.parents] if p.is_dir()), None)
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        readonly = os.statvfs(folder).f_flag & os.ST_RDONLY
        why = "read-only file system" if readonly else "permission denied"
        raise ConverterError(f"{flag} {escape(str(target))}: cannot write in {escape(str(folder))} ({why})")


def _refuse_protected(flag: str, path: Path, target: Path, protected: Iterable[Protected]) -> None:
    """Refuse `path` (resolved: `target`) when it is, contains or lies inside a protected path."""
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
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


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
    """What an existing `path` is once links are followed (`kind_of`; None when nothing is there).
    `stat` follows /dev/stdout's link to a pipe where `resolve` cannot."""
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
