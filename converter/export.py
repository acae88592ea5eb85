"""The one writer: every file and folder the tool writes is staged beside its target and moved into place.

- `staged_output` (a folder) and `staged_file` (a file) check the target against the path policy
  (`converter.paths`), create a staging entry beside it under a name its owner can be told by (pid,
  plus a lock held for the run's life) — which proves the folder writable before any work — and
  move it into place in one step that cannot clobber what appeared meanwhile; `--overwrite` swaps
  the old one out only once the new one is complete. Any failure, including SIGINT/SIGTERM/SIGHUP
  (`signals_as_exceptions`), removes the staging entry; one whose owner died (SIGKILL) is removed
  by the next run to that target. `write_file` writes a small file through `staged_file`.
- `write_weights` writes model.safetensors and reads it back through an mmap, confirming it holds
  exactly the tensors it was given, before anything is moved into place.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from converter.errors import ConverterError, escape
from converter.paths import Protected, check_target, what_is_there

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: staging folders are then told apart by the pid alone
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")
WEIGHTS_NAME = "model.safetensors"
# Mapped pages of the file being read back count towards the process's RSS until it is closed, so it
# is reopened before mapping more than this (or one larger tensor): the read-back adds that much to
# the peak RSS, not the model's size.
READ_BACK_BATCH_BYTES = 32 << 20


# --- signals ---------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP arrived: unwinds like KeyboardInterrupt, so staging folders are removed.

    `exit_code` is the shell's 128 + signal number (130 SIGINT, 143 SIGTERM); `str()` is the one line
    to print, with what became of the output once `staged_output` has handled it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.outcome = ""

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}" + (f"; {self.outcome}" if self.outcome else "")


class _SignalState:
    raised = False  # one Interrupted is on its way: later signals are ignored while it unwinds
    deferring = 0  # inside _signals_deferred: remember the signal, raise it at the end
    pending: int | None = None


_signals = _SignalState()
_HANDLED = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _signals.raised:
        return
    if _signals.deferring:
        _signals.pending = _signals.pending or signum
        return
    _signals.raised = True
    raise Interrupted(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` while the block runs (main thread only;
    elsewhere a no-op), so cleanup runs and the caller can exit with `err.exit_code` and one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _HANDLED}
    _signals.raised, _signals.pending = False, None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold a signal back while the block runs (a commit or a cleanup must not stop halfway), then
    raise it at the end of the outermost such block."""
    _signals.deferring += 1
    try:
        yield
    finally:
        _signals.deferring -= 1
        if not _signals.deferring and _signals.pending and not _signals.raised:
            signum, _signals.pending = _signals.pending, None
            _signals.raised = True
            raise Interrupted(signum)


# --- writing and reading back the weights ----------------------------------------------------------


def write_weights(
    folder: Path, state_dict: Mapping[str, torch.Tensor], cancel: threading.Event | None = None
) -> None:
    """model.safetensors, as `XCLIPModel.from_pretrained` reads it, read back and compared with
    `state_dict` (skipped once `cancel` is set: the run is being abandoned)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = folder / WEIGHTS_NAME
    try:
        # safetensors writes from the tensors' memory; only the two transposed views need packing.
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
    """Open `path` with safetensors (mmap) and confirm it holds exactly `state_dict`: the same keys,
    and for each the same dtype, shape and bytes. A difference is a ConverterError naming the key."""
    from safetensors import SafetensorError, safe_open

    keys = list(state_dict)
    try:
        with safe_open(path, framework="pt") as f:
            _same_keys(path, f.keys(), keys)
            for key in keys:
                _same_layout(path, key, f.get_slice(key), state_dict[key])
        for batch in _batches(keys, state_dict, batch_bytes):
            with safe_open(path, framework="pt") as f:
                for key, rows in batch:
                    if cancel is not None and cancel.is_set():
                        return
                    got = f.get_slice(key)[rows] if rows is not None else f.get_tensor(key)
                    want = state_dict[key][rows] if rows is not None else state_dict[key]
                    if not _bitwise_equal(got, want):
                        raise ConverterError(
                            f"{path} read back does not hold the verified weights: {key!r} has {_DIFFERENT}"
                        )
    except (OSError, SafetensorError) as err:
        raise ConverterError(f"could not read back {path}: {_short_io_error(err)}") from err


_DIFFERENT = "different values"
Piece = tuple[str, "slice | None"]  # a key, and the rows of it to compare (None: all of it)


def _batches(keys: list[str], state_dict: Mapping[str, torch.Tensor], limit: int) -> Iterator[list[Piece]]:
    """Pieces of at most `limit` bytes in all (a tensor larger than that is cut into runs of rows), so
    that no more of the file is mapped at once: mapped pages count towards the peak RSS."""
    batch: list[Piece] = []
    size = 0
    for key in keys:
        tensor = state_dict[key]
        row_bytes = tensor.nbytes // tensor.shape[0] if tensor.dim() and tensor.shape[0] else tensor.nbytes
        rows = max(1, limit // max(row_bytes, 1))
        pieces = (
            [(None, tensor.nbytes)]
            if tensor.nbytes <= limit or not tensor.dim()
            else [
                (
                    slice(start, start + rows),
                    row_bytes * len(range(start, min(start + rows, tensor.shape[0]))),
                )
                for start in range(0, tensor.shape[0], rows)
            ]
        )
        for rows_slice, nbytes in pieces:
            if batch and size + nbytes > limit:
                yield batch
                batch, size = [], 0
            batch.append((key, rows_slice))
            size += nbytes
    if batch:
        yield batch


def _same_keys(path: Path, written: Iterable[str], expected: list[str]) -> None:
    written, wanted = set(written), set(expected)
    if written != wanted:
        extra, missing = sorted(written - wanted), sorted(wanted - written)
        what = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} was not meant to be there"
        raise ConverterError(f"{path} read back does not hold the verified weights: {what}")


def _same_layout(path: Path, key: str, got: object, expected: torch.Tensor) -> None:
    """The dtype and shape safetensors' header gives `key` (a slice's, so no data is read)."""
    from safetensors.torch import _TYPES  # safetensors' names of torch dtypes ("F32": torch.float32)

    dtype, shape = _TYPES.get(got.get_dtype(), got.get_dtype()), tuple(got.get_shape())
    if dtype != expected.dtype:
        what = f"dtype {dtype} instead of {expected.dtype}"
    elif shape != tuple(expected.shape):
        what = f"shape {shape} instead of {tuple(expected.shape)}"
    else:
        return
    raise ConverterError(f"{path} read back does not hold the verified weights: {key!r} has {what}")


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (NaN equals the same NaN, -0.0 differs from 0.0), for tensors of one dtype and shape.

    memcmp where both are contiguous: torch.equal starts a parallel loop per call, ~1 s of CPU for
    base-patch32's 443 tensors against ~0.1 s. Otherwise (a transposed view) torch.equal on the
    same-size integers, a view that needs no copy."""
    if a.nbytes == 0:
        return True
    if _memcmp is not None and a.is_contiguous() and b.is_contiguous() and a.is_cpu and b.is_cpu:
        return _memcmp(a.data_ptr(), b.data_ptr(), a.nbytes) == 0
    import torch

    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
    if as_int is None or a.is_complex():
        return torch.equal(a, b)
    return torch.equal(a.view(as_int), b.view(as_int))


_memcmp = None
if os.name == "posix":
    with suppress(OSError, AttributeError):
        _memcmp = ctypes.CDLL(None).memcmp
        _memcmp.restype = ctypes.c_int
        _memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _short_io_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    return re.sub(r" \(os error \d+\)$", "", str(err).split("I/O error: ", 1)[-1])


def in_background(function: Callable[..., T], *args: object) -> Future[T]:
    """`function(*args)` on a thread of its own; the future says when it is done and what it raised."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=function.__name__.strip("_"))
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)  # the submitted call still runs; nothing else will
    return future


@contextmanager
def weights_written_meanwhile(
    folder: Path, state_dict: Mapping[str, torch.Tensor]
) -> Iterator[Callable[[], None]]:
    """Write (and read back) model.safetensors on a second thread while the block runs, and wait for
    it at the end.

    Conversion is I/O-bound and safetensors' writer releases the GIL, so the write overlaps with
    importing transformers, verifying and writing the small files. The block gets a `wait()` that
    returns once the weights are written and read back (or raises the writer's error), for work that
    should follow the write. If the block raises (or a signal arrives while waiting), that error
    wins: the writer is told to skip the read-back and is waited for, so nothing writes into a
    folder being removed.
    """
    cancel = threading.Event()
    written = in_background(write_weights, folder, state_dict, cancel)
    finished = False
    try:
        yield written.result
        written.result()
        finished = True
    finally:
        if not finished:
            cancel.set()
            with _signals_deferred():
                wait_for([written])


# --- staging and moving into place -----------------------------------------------------------------


@contextmanager
def staged_output(
    output: Path,
    overwrite: bool,
    protected: Iterable[Protected] = (),
    *,
    flag: str = "--output",
) -> Iterator[Path]:
    """A staging folder beside `output`, moved into place when the block succeeds and removed when it
    fails or is interrupted, so a failed, refused or interrupted run never leaves a half-written output.

    `output` must pass the path policy (`converter.paths.check_target`; `flag` names it in messages).
    The move cannot replace a folder that appeared during the run (ConverterError instead). With
    `overwrite`, an existing output is swapped out in one step only after the new folder is complete,
    and only if it is still the folder that was there when the block began (unchanged at its top
    level); it is then removed. An OSError in the block becomes a ConverterError naming the file.
    """
    where = f"{flag} {escape(str(output))}"
    target = check_target(output, kind="folder", overwrite=overwrite, protected=protected, flag=flag)
    _prepare_parent(target, where, folders=True)
    before = _identity(target)
    staging = lock = None
    state = {"staging_is_ours": True, "committed": False}
    try:
        with _signals_deferred():  # created and locked, or not at all
            staging, lock = _create_staging(target, where, os.mkdir)
        with _named_as(staging, output, where):
            yield staging
        with _signals_deferred():
            _honour_umask(staging, where)
        with _commit_lock(target.parent), _signals_deferred():
            _commit(staging, target, before, overwrite, where, state)
    except BaseException as err:
        with _signals_deferred():
            if staging is not None and state["staging_is_ours"]:
                shutil.rmtree(staging, ignore_errors=True)
        _tell_outcome(err, where, state["committed"])
        raise
    finally:
        if lock is not None:
            os.close(lock)


@contextmanager
def staged_file(
    output: Path,
    overwrite: bool,
    protected: Iterable[Protected] = (),
    *,
    flag: str = "--output",
) -> Iterator[Path]:
    """`staged_output` for one file: a partial file beside `output` (beside where a symlink points),
    named and locked by its owner (mode from the umask), renamed onto it when the block succeeds and
    removed when it fails or is interrupted. Without `overwrite`, a file that appeared meanwhile is
    kept and the run refused."""
    where = f"{flag} {escape(str(output))}"
    target = check_target(output, kind="file", overwrite=overwrite, protected=protected, flag=flag)
    _prepare_parent(target, where, folders=False)
    partial = lock = None
    committed = False
    try:
        with _signals_deferred():
            partial, lock = _create_staging(target, where, _create_file)
        with _named_as(partial, output, where):
            yield partial
        with _commit_lock(target.parent), _signals_deferred():
            if not overwrite and os.path.lexists(target):
                raise ConverterError(f"{where} exists; pass --overwrite to replace it")
            if (there := what_is_there(target)) not in (None, "a regular file"):
                raise ConverterError(f"{where} became {there} while writing; it was left as it is")
            try:
                os.replace(partial, target)
            except OSError as err:
                raise ConverterError(f"{where}: cannot move it into place: {err.strerror}") from err
            committed = True
    except BaseException as err:
        with _signals_deferred():
            if partial is not None and not committed:
                with suppress(OSError):
                    os.unlink(partial)
        _tell_outcome(err, where, committed)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def write_file(
    path: Path,
    data: str | bytes,
    *,
    flag: str,
    overwrite: bool = True,
    protected: Iterable[Protected] = (),
) -> None:
    """A small file (a report, a record, a fixture), written whole or not at all by `staged_file`."""
    with staged_file(path, overwrite, protected, flag=flag) as partial:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def torch_save(obj: object, path: Path) -> None:
    """`torch.save` to `path`, failing with the OSError (ENOSPC, EIO) that `staged_file` names.

    Written through a Python file, so the failure is the file's OSError; torch's zip writer then
    replaces it with its own RuntimeError ("enforce fail at inline_container.cc") while closing,
    keeping the OSError as its context, which is the error put back here."""
    import torch

    try:
        with open(path, "wb") as file:
            torch.save(obj, file)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


def _prepare_parent(target: Path, where: str, folders: bool) -> None:
    """The output's folder exists, and no staging left by a dead run to this output remains in it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        missing = err.filename or target.parent
        raise ConverterError(f"{where}: cannot create {missing}: {err.strerror}") from err
    _remove_stale_staging(target, folders)


@contextmanager
def _named_as(staging: Path, output: Path, where: str) -> Iterator[None]:
    """The block's failures name the output as the user knows it, not the staging about to go."""
    try:
        yield
    except OSError as err:
        shown = str(err.filename or staging).replace(str(staging), str(output), 1)
        raise ConverterError(
            f"could not write {escape(shown)}: {err.strerror or err}; {where} was not changed"
        ) from err
    except ConverterError as err:
        if str(staging) not in str(err):
            raise
        shown = str(err).replace(str(staging), str(output))
        raise ConverterError(f"{shown}; {where} was not changed") from err


def _tell_outcome(err: BaseException, where: str, committed: bool) -> None:
    if isinstance(err, Interrupted) and not err.outcome:
        err.outcome = f"{where} " + ("was complete first" if committed else "was not changed")


_STAGING_FORMAT = ".{name}.partial-{pid}-{token}"


def _create_staging(target: Path, where: str, create: Callable[[Path], None]) -> tuple[Path, int | None]:
    """An empty folder or file (`create`; mode from the umask, unlike mkdtemp's 0700 or mkstemp's
    0600) beside `target`, named after this process, locked for as long as the returned descriptor
    is open."""
    for _ in range(100):
        name = _STAGING_FORMAT.format(name=target.name, pid=os.getpid(), token=secrets.token_hex(4))
        staging = target.parent / name
        try:
            create(staging)
        except FileExistsError:
            continue
        except OSError as err:
            raise ConverterError(f"{where}: cannot create {staging}: {err.strerror}") from err
        return staging, _lock(staging)
    raise ConverterError(f"{where}: cannot create a staging name in {target.parent}")


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no locks on this filesystem: the pid in the name still protects the folder
    return fd


def _remove_stale_staging(target: Path, folders: bool) -> None:
    """Remove staging folders (or, for a file output, staging files) of earlier runs to this output
    whose owner is gone: its pid is not running and nobody holds its lock. Nothing else is touched."""
    pattern = re.compile(re.escape(f".{target.name}.partial-") + r"(\d+)-[0-9a-f]{8}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        kind_ok = entry.is_dir(follow_symlinks=False) if folders else entry.is_file(follow_symlinks=False)
        if not found or not kind_ok or _pid_alive(int(found[1])):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        continue  # held: its owner runs (in another pid namespace, say)
            if folders:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with suppress(OSError):
                    os.unlink(entry.path)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells the folder we were asked to replace from one put there meanwhile: the inode, and
    the mtime, which changes when an entry is added, removed or renamed at its top level."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _honour_umask(folder: Path, where: str) -> None:
    """Give every folder and file the mode a plain mkdir/open would have (safetensors writes 0600,
    a copied file keeps its source's mode). The umask is read by setting it: a moment no thread of
    ours creates a file in (the writer thread has finished)."""
    mask = os.umask(0o022)
    os.umask(mask)
    try:
        os.chmod(folder, 0o777 & ~mask)
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask, follow_symlinks=False)
            for name in files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o666 & ~mask)
    except OSError as err:
        raise ConverterError(f"{where}: cannot set the mode of {err.filename}: {err.strerror}") from err


@contextmanager
def _commit_lock(folder: Path) -> Iterator[None]:
    """One run at a time moves an output into `folder`. Without renameat2 a swap is several renames,
    and two runs interleaving them could each undo the other's; the wait is interruptible (signals are
    deferred only once the lock is held)."""
    fd = None
    if fcntl is not None:
        with suppress(OSError):
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if fd is not None:
            with suppress(OSError):  # no locks on this filesystem: the checks in _commit still hold
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _commit(
    staging: Path,
    target: Path,
    before: tuple[int, int, int] | None,
    overwrite: bool,
    where: str,
    state: dict[str, bool],
) -> None:
    appeared = ConverterError(
        f"{where} appeared or changed while converting (another run?); it was left as it was "
        f"and nothing was written; run again{'' if overwrite else ' with --overwrite to replace it'}"
    )
    if before is not None:
        try:
            retired = _swap(staging, target)
        except FileNotFoundError:
            retired = None  # it went away meanwhile: nothing to replace
        except FileExistsError:
            raise appeared from None
        except OSError as err:
            raise ConverterError(f"{where}: cannot replace it: {err.strerror}") from err
        if retired is not None:
            state["staging_is_ours"] = False  # it holds the old folder now, or nothing
            if _identity(retired) != before or (not overwrite and _has_entries(retired)):
                _swap_back(staging, target, retired, where, state)
                raise appeared
            state["committed"] = True
            if overwrite:
                shutil.rmtree(retired, ignore_errors=True)
            else:
                with suppress(OSError):
                    os.rmdir(retired)
            return
    try:
        _move_noreplace(staging, target)
    except FileExistsError:
        raise appeared from None
    except OSError as err:
        raise ConverterError(f"{where}: cannot move {staging} into place: {err.strerror}") from err
    state["staging_is_ours"] = False
    state["committed"] = True


def _has_entries(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return True


def _swap(staging: Path, target: Path) -> Path:
    """Put the new folder at `target`; return where the old one went (raises FileNotFoundError when
    `target` is gone). One atomic exchange where the filesystem has it."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging
    retired = staging.with_name(staging.name + ".old")  # not a staging name: never removed as stale
    os.rename(target, retired)
    try:
        _move_noreplace(staging, target)
    except OSError as err:
        try:
            os.rename(retired, target)
        except OSError:
            raise ConverterError(
                f"{target} changed while converting and could not be put back: the folder that was there "
                f"is now {retired}"
            ) from err
        raise
    return retired


def _swap_back(staging: Path, target: Path, retired: Path, where: str, state: dict[str, bool]) -> None:
    """Undo `_swap`: the old folder back at `target`, ours back at `staging`."""
    try:
        if retired == staging:
            if not _renameat2(staging, target, _RENAME_EXCHANGE):
                raise OSError(errno.EINVAL, "exchange not supported")
        else:
            os.rename(target, staging)
            os.rename(retired, target)
    except OSError as err:
        raise ConverterError(
            f"{where} changed while converting and could not be put back: the folder that was "
            f"there is now {retired} ({err.strerror})"
        ) from err
    state["staging_is_ours"] = True


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_libc_renameat2 = None
if sys.platform.startswith("linux"):
    with suppress(OSError, AttributeError):
        _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2: True when done, False where the C library or filesystem lacks it (the
    caller then falls back); other failures raise OSError (EEXIST as FileExistsError)."""
    if _libc_renameat2 is None:
        return False
    if _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _move_noreplace(staging: Path, target: Path) -> None:
    """Rename `staging` to `target` unless something is there (FileExistsError then), even an empty
    folder, which a plain rename would replace."""
    if _renameat2(staging, target, _RENAME_NOREPLACE):
        return
    # No renameat2: claim the name with mkdir (atomic, fails if anything is there), then replace our
    # own empty claim; a file put into the claim meanwhile makes the rename fail instead.
    os.mkdir(target)
    try:
        os.rename(staging, target)
    except OSError as err:
        with suppress(OSError):
            os.rmdir(target)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(err.errno, err.strerror, str(target)) from err
        raise
