"""The one writer: every output is staged beside its target (named after its owner's pid, locked), then
moved into place without clobbering what appeared meanwhile. A failure or a signal removes the staging
entry; one whose owner died is removed by the next run. Also the weights' write and read-back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import TYPE_CHECKING, TypeVar

from converter.errors import ConverterError, escape
from converter.paths import Kind, Protected, check_target, what_is_there

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
WEIGHTS_NAME = "model.safetensors"
# Mapped pages of the file being read back count towards the RSS until it is closed, so it is
# reopened after this many bytes: the read-back adds that much to the peak RSS, not the model's size.
READ_BACK_BATCH_BYTES = 32 << 20


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP, unwinding like KeyboardInterrupt; `str()` says what became of the output."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum
        self.outcome = ""

    def __str__(self) -> str:
        name = signal.Signals(self.args[0]).name
        return f"interrupted by {name}" + (f"; {self.outcome}" if self.outcome else "")


# raised: the first signal raised as an Interrupted (0: none); deferring: inside _signals_deferred.
_signals = SimpleNamespace(raised=0, deferring=0, pending=None)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _signals.deferring:
        _signals.pending = _signals.pending or signum
    else:  # a repeated signal too: a library's bare `except:` may have swallowed the first
        _signals.raised = _signals.raised or signum
        raise Interrupted(signum)


def signal_raised() -> int:
    """The signal the last `signals_as_exceptions` block raised as an `Interrupted`, 0 if none: what a
    library it broke halfway (a module left half-imported) failed with next is that interruption."""
    return _signals.raised


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    _signals.raised, _signals.pending = 0, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold a signal back until the outermost such block ends: a move or a cleanup must not stop halfway."""
    _signals.deferring += 1
    try:
        yield
    finally:
        _signals.deferring -= 1
        if not _signals.deferring and _signals.pending:
            signum, _signals.pending = _signals.pending, None
            _on_signal(signum, None)


def write_weights(
    folder: Path, state_dict: Mapping[str, torch.Tensor], cancel: threading.Event | None = None
) -> None:
    """Write model.safetensors and read it back (unless `cancel` is set: the run is being abandoned)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = folder / WEIGHTS_NAME
    try:
        # safetensors writes from the tensors' memory; only the transposed views need packing.
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:
        raise ConverterError(f"could not write {path}: {_short_io_error(err)}") from err
    if cancel is None or not cancel.is_set():
        check_written(path, state_dict, cancel)


def check_written(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    cancel: threading.Event | None = None,
    batch_bytes: int = READ_BACK_BATCH_BYTES,
) -> None:
    """Confirm that `path` holds exactly `state_dict`'s keys, dtypes, shapes and bytes; else name the key."""
    import numpy as np
    import torch
    from safetensors import SafetensorError, safe_open

    def differs(what: str) -> ConverterError:
        return ConverterError(f"{path} read back does not hold the verified weights: {what}")

    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    try:
        with safe_open(path, framework="pt") as f:
            written, wanted = set(f.keys()), set(state_dict)
        if missing := sorted(wanted - written):
            raise differs(f"{missing[0]!r} is missing")
        if extra := sorted(written - wanted):
            raise differs(f"{extra[0]!r} was not meant to be there")
        for batch in _batches(state_dict, batch_bytes):
            with safe_open(path, framework="pt") as f:
                for key, rows in batch:
                    if cancel is not None and cancel.is_set():
                        return
                    want, header = state_dict[key], f.get_slice(key)
                    if (shape := tuple(header.get_shape())) != want.shape:  # before `rows` slices it
                        raise differs(f"{key!r} has shape {shape} instead of {tuple(want.shape)}")
                    got = f.get_tensor(key) if rows is None else header[rows]
                    if got.dtype != want.dtype:
                        raise differs(f"{key!r} has dtype {got.dtype} instead of {want.dtype}")
                    want = want if rows is None else want[rows]
                    # Bitwise (NaN equals the same NaN, -0.0 differs from 0.0): numpy on integer views,
                    # which copy nothing; torch.equal costs ~9x as much on base-patch32.
                    same_int = as_int[want.element_size()]
                    if not np.array_equal(got.view(same_int).numpy(), want.view(same_int).numpy()):
                        raise differs(f"{key!r} has different values")
    except (OSError, SafetensorError) as err:
        raise ConverterError(f"could not read back {path}: {_short_io_error(err)}") from err


def _batches(state_dict: Mapping[str, torch.Tensor], limit: int) -> Iterator[list[tuple[str, slice | None]]]:
    """Batches of (key, rows) of at most `limit` bytes; rows None is the whole tensor."""
    batch: list[tuple[str, slice | None]] = []
    size = 0
    for key, tensor in state_dict.items():
        if tensor.nbytes <= limit or tensor.dim() == 0:
            pieces = [(None, tensor.nbytes)]
        else:
            step = max(1, limit * len(tensor) // tensor.nbytes)
            pieces = [(slice(i, i + step), tensor[i : i + step].nbytes) for i in range(0, len(tensor), step)]
        for rows, nbytes in pieces:
            if batch and size + nbytes > limit:
                yield batch
                batch, size = [], 0
            batch.append((key, rows))
            size += nbytes
    if batch:
        yield batch


def _short_io_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    return re.sub(r" \(os error \d+\)$", "", str(err).split("I/O error: ", 1)[-1])


def in_background(function: Callable[..., T], *args: object) -> Future[T]:
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=function.__name__.strip("_"))
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)  # the submitted call still runs; nothing else will
    return future


@contextmanager
def weights_written_meanwhile(
    folder: Path, state_dict: Mapping[str, torch.Tensor]
) -> Iterator[Callable[[], None]]:
    """`write_weights` on a second thread while the block runs; the block gets its `wait()`. If the block
    raises, the writer skips the read-back and is waited for: nothing writes into a folder being removed."""
    cancel = threading.Event()
    written = in_background(write_weights, folder, state_dict, cancel)
    try:
        yield written.result
        written.result()
    except BaseException:
        cancel.set()
        with _signals_deferred():
            written.exception()  # waits, and leaves the block's own error to be raised
        raise


@contextmanager
def staged_output(
    output: str | Path,
    overwrite: bool,
    protected: Iterable[Protected] = (),
    *,
    flag: str = "--output",
    kind: Kind = "folder",
) -> Iterator[Path]:
    """A staging folder beside `output` (`flag` names it), moved into place when the block succeeds,
    removed when it fails; an OSError in the block becomes one line naming the file as the user knows it."""
    where = f"{flag} {escape(str(output))}"
    target = check_target(output, kind=kind, overwrite=overwrite, protected=protected, flag=flag)
    _remove_stale_staging(target, kind)
    before = identity(target)
    made = [folder for folder in target.parents if not folder.exists()]  # innermost first
    staging = lock = None
    committed = False
    try:
        with _signals_deferred():  # created and locked, or not at all
            staging, lock = _create_staging(target, kind, where)
        try:
            yield staging
        except (OSError, ConverterError) as err:  # named as the user knows the output, not as the staging
            if isinstance(err, OSError):  # a write only if in the staging: else a read, of an input
                # A copy's error names its source first, then the file it was writing.
                name = str(err.filename2 if str(staging) in str(err.filename2) else err.filename or staging)
                message = f"{'could not write ' if str(staging) in name else ''}{name}: {err.strerror or err}"
            elif str(staging) in str(err):
                message = str(err)
            else:
                raise
            named = escape(message.replace(str(staging), str(output)))  # escape leaves printable text as is
            raise ConverterError(f"{named}; {where} was not changed") from err
        with _commit_lock(target.parent), _signals_deferred():
            try:
                if kind == "folder":
                    _honour_umask(staging)
                    _move_folder(staging, target, before, overwrite, where)
                else:
                    _move_file(staging, target, overwrite, where)
            except FileExistsError:
                again = "" if overwrite else " with --overwrite to replace it"
                raise ConverterError(
                    f"{where} appeared or changed while converting (another run?); it was left as it "
                    f"was and nothing was written; run again{again}"
                ) from None
            except OSError as err:
                raise ConverterError(f"{where}: cannot move it into place: {err.strerror}") from err
            committed = True
    except BaseException as err:
        with _signals_deferred():
            if lock is not None:
                _remove_if_ours(staging, lock)
            for folder in made:  # the folders _create_staging made, unless something is in them now
                with suppress(OSError):
                    os.rmdir(folder)
        if isinstance(err, Interrupted) and not err.outcome:
            err.outcome = f"{where} " + ("was complete first" if committed else "was not changed")
        raise
    finally:
        if lock is not None:
            os.close(lock)


def staged_file(
    output: str | Path, overwrite: bool, protected: Iterable[Protected] = (), *, flag: str = "--output"
) -> AbstractContextManager[Path]:
    """`staged_output` for one file, renamed onto `output` (or where a symlink there points)."""
    return staged_output(output, overwrite, protected, flag=flag, kind="file")


def write_file(path: Path, data: str | bytes, *, flag: str, protected: Iterable[Protected] = ()) -> None:
    """A small file (a report, a record, a fixture), written whole or not at all, replacing what was there."""
    with staged_file(path, True, protected, flag=flag) as partial:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def torch_save(obj: object, path: Path) -> None:
    """`torch.save`, failing with what its zip writer wraps in a RuntimeError when closing the archive: an
    OSError (ENOSPC, EIO), or the `Interrupted` of a signal that arrived while it wrote."""
    import torch

    try:
        with open(path, "wb") as file:
            torch.save(obj, file)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError | Interrupted):
            raise err.__context__ from None
        raise


def _create_staging(target: Path, kind: Kind, where: str) -> tuple[Path, int]:
    """An empty entry beside `target` (its folder made) and its locked descriptor; its mode from the umask,
    unlike mkdtemp's."""
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "folder":
            os.mkdir(staging)
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        size = len(os.fsencode(target.name))  # NAME_MAX counts bytes
        if err.errno == errno.ENAMETOOLONG and size <= 255:  # the name fits; the staging name does not
            extra = len(os.fsencode(staging.name)) - size + len(".old")
            raise ConverterError(
                f"{where}: the name is too long for the staging entry beside it, which adds {extra} "
                f"bytes: choose a name of at most {255 - extra}"
            ) from err
        raise ConverterError(f"{where}: cannot create {err.filename or staging}: {err.strerror}") from err
    _lock(fd)
    return staging, fd


def _remove_if_ours(staging: Path, lock: int) -> None:
    """Remove the staging entry `lock` is open on, unless the old folder was swapped to its path."""
    with suppress(OSError):
        if not os.path.samestat(os.lstat(staging), os.fstat(lock)):
            return
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.unlink(staging)


def _remove_stale_staging(target: Path, kind: Kind) -> None:
    """Remove earlier runs' staging entries for `target` whose pid is not running and whose lock is free."""
    pattern = re.compile(re.escape(f".{target.name}.partial-") + r"(\d+)-[0-9a-f]{8}")
    entries: list[os.DirEntry[str]] = []
    with suppress(OSError):
        entries = list(os.scandir(target.parent))
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        is_kind = entry.is_dir if kind == "folder" else entry.is_file
        if not found or not is_kind(follow_symlinks=False) or _pid_alive(int(found[1])):
            continue
        with suppress(OSError):  # one it cannot open is left alone
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                if _lock(fd):  # else its owner runs (in another pid namespace, say)
                    _remove_if_ours(Path(entry.path), fd)
            finally:
                os.close(fd)


def _lock(fd: int, wait: bool = False) -> bool:
    """Lock `fd` until it is closed; False when another process holds it (no locks at all: True)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid: kept all the same
        pass
    return True


def identity(path: str | Path) -> tuple[int, int, int, int] | None:
    """Device, inode, size and mtime (which any change at a folder's top level updates): tells a file or
    folder put in its place, or written into, meanwhile; None when nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _honour_umask(folder: Path) -> None:
    """Give everything in `folder` the umask's mode that mkdir gave it (safetensors writes 0600), where the
    filesystem keeps modes (FAT, exFAT and SMB mounts refuse chmod)."""
    mode = os.stat(folder).st_mode & 0o777
    try:
        for path in folder.rglob("*"):  # links are neither followed nor changed
            if not path.is_symlink():
                path.chmod(mode if path.is_dir() else mode & 0o666)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP):
            raise


@contextmanager
def _commit_lock(folder: Path) -> Iterator[None]:
    """One run at a time moves an output into `folder`: without renameat2 a swap is several renames."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a folder we may write in but not read (mode -wx): the checks when moving hold
        yield
        return
    try:
        _lock(fd, wait=True)
        yield
    finally:
        os.close(fd)


def _move_file(partial: Path, target: Path, overwrite: bool, where: str) -> None:
    if not overwrite and os.path.lexists(target):
        raise ConverterError(f"{where} exists; pass --overwrite to replace it")
    if (there := what_is_there(target)) not in (None, "a regular file"):
        raise ConverterError(f"{where} became {there} while writing; it was left as it is")
    os.replace(partial, target)


def _move_folder(
    staging: Path, target: Path, before: tuple[int, int, int, int] | None, overwrite: bool, where: str
) -> None:
    """Put `staging` at `target`, replacing the folder there only if it is still `before` (and empty, without
    `overwrite`); else that folder is put back and FileExistsError raised."""
    if before is None:
        return _move_noreplace(staging, target)
    # The old folder goes aside: exchanged with ours in one step where the filesystem can, else renamed.
    retired = staging.with_name(staging.name + ".old")  # not a staging name: never removed as stale
    try:
        if _renameat2(staging, target, _RENAME_EXCHANGE):
            retired = staging
        else:
            os.rename(target, retired)
    except FileNotFoundError:  # gone meanwhile
        return _move_noreplace(staging, target)
    try:
        if identity(retired) != before or (not overwrite and os.listdir(retired)):
            raise FileExistsError(errno.EEXIST, "changed while converting", str(target))
        if retired != staging:  # renamed aside, not exchanged: ours is still to be moved in
            _move_noreplace(staging, target)
    except OSError:
        try:
            if retired == staging:
                _renameat2(staging, target, _RENAME_EXCHANGE)
            elif not _renameat2(retired, target, _RENAME_NOREPLACE):
                os.rename(retired, target)  # a file too; what it could replace: an empty folder, just made
        except OSError as err:
            raise ConverterError(
                f"{where} changed while converting and could not be put back: the folder that was "
                f"there is now {retired} ({err.strerror})"
            ) from err
        raise
    if overwrite:
        shutil.rmtree(retired, ignore_errors=True)
        if os.path.lexists(retired):  # write-protected files in it: ours is in place, theirs not gone
            logging.getLogger("converter").warning(
                "%s replaced, but the old folder could not be removed entirely: what is left of it is at %s; "
                "remove it yourself",
                where,
                escape(str(retired)),
            )
    else:
        with suppress(OSError):
            os.rmdir(retired)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc_renameat2 = None
with suppress(OSError, AttributeError):
    _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2: True when done, False where the C library or filesystem lacks it."""
    if _libc_renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: the paths are taken as given
    if _libc_renameat2(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _move_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, or FileExistsError if anything is there (rename replaces an empty folder)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    # Claim the name with mkdir, then rename onto our own empty claim (a file put in it fails the rename).
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError as err:
        with suppress(OSError):
            os.rmdir(dst)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(err.errno, err.strerror, str(dst)) from err
        raise
