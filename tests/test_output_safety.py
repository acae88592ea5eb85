"""The output folder is never lost, clobbered or left half-written: refused outputs, racing runs,
signals, SIGKILL leftovers, the umask, disk full and read-only filesystems (issue #9, item 1)."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from converter import export
from converter.errors import ConverterError
from converter.export import (
    WEIGHTS_NAME,
    Interrupted,
    signals_as_exceptions,
    staged_file,
    staged_output,
    weights_written_meanwhile,
)
from converter.paths import Protected, check_target, what_is_there
from tests import helpers

WEIGHTS = {"w": torch.arange(12.0).reshape(3, 4)}


@pytest.fixture(params=["renameat2", "fallback"])
def rename(request, monkeypatch):
    """Every placement test runs with Linux's renameat2 and with the portable fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(export, "_libc_renameat2", None)
    elif export._libc_renameat2 is None:
        pytest.skip("no renameat2 in this C library")
    return request.param


def check_output(output: Path, overwrite: bool, protected: Iterable[Protected] = ()) -> Path:
    return check_target(output, kind="folder", overwrite=overwrite, protected=protected)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- outputs refused before any work ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "protected", "relation"),
    [
        (
            "out",
            "out/ft.pth",
            "contains",
        ),  # the observed loss: --checkpoint out/ft.pth --output out --overwrite
        ("cache", "cache", "is"),
        ("cache/models", "cache", "lies inside"),
        ("config.json", "config.json", "is"),
        ("a", "a/b/c/ckpt.pth", "contains"),
    ],
)
def test_an_output_that_is_holds_or_lies_in_a_protected_path_is_refused(
    tmp_path, output, protected, relation
):
    (tmp_path / protected).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / protected).write_text("precious")
    label = "--checkpoint"
    with pytest.raises(ConverterError) as err:
        check_output(tmp_path / output, overwrite=True, protected=[(label, tmp_path / protected)])
    assert str(err.value) == (
        f"--output {tmp_path / output} {relation} {label} {tmp_path / protected}; choose another --output"
    )
    assert (tmp_path / protected).read_text() == "precious"


def test_protected_paths_are_compared_through_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "ft.pth").write_text("precious")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConverterError, match="contains --checkpoint"):
        check_output(
            tmp_path / "link", overwrite=True, protected=[("--checkpoint", tmp_path / "real/ft.pth")]
        )
    with pytest.raises(ConverterError, match="contains --checkpoint"):
        check_output(
            tmp_path / "real", overwrite=True, protected=[("--checkpoint", tmp_path / "link/ft.pth")]
        )


def test_a_checkpoint_given_as_a_file_url_is_protected_whatever_the_schemes_case(tmp_path):
    """fetch reads FILE:// as file:// (a URL's scheme is case-insensitive), so the policy must see the
    same local file: else --overwrite replaces the folder holding the input."""
    from converter import fetch, paths

    checkpoint = tmp_path / "out" / "ft.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_text("precious")
    for url in (checkpoint.as_uri(), "FILE://" + checkpoint.as_uri().removeprefix("file://")):
        assert fetch.fetch_url(url) == checkpoint
        with pytest.raises(
            ConverterError, match=f"^--output {tmp_path / 'out'} contains --checkpoint {checkpoint};"
        ):
            check_output(tmp_path / "out", overwrite=True, protected=paths.protected(checkpoint=url))
    assert checkpoint.read_text() == "precious"


def test_the_overwrite_that_deleted_the_input_now_keeps_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ft.pth").write_text("precious")
    with pytest.raises(ConverterError, match="contains --checkpoint"):
        with staged_output(tmp_path / "out", True, [("--checkpoint", tmp_path / "out" / "ft.pth")]):
            pass
    assert (tmp_path / "out" / "ft.pth").read_text() == "precious" and names(tmp_path) == ["out"]


def test_the_library_protects_the_config_it_read_and_paths_given_as_text(tmp_path):
    from converter.pipeline import convert_checkpoint, write_folder

    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    result = convert_checkpoint(helpers.checkpoint("tiny-a"), config=config, verify=False)
    with pytest.raises(ConverterError, match=f"^--output {tmp_path / 'cfg'} contains --config {config};"):
        write_folder(result, tmp_path / "cfg", overwrite=True)
    with pytest.raises(ConverterError, match=f"^--output {tmp_path / 'cfg'} contains my notes {config};"):
        convert_checkpoint(
            helpers.checkpoint("tiny-a"),
            output=tmp_path / "cfg",
            overwrite=True,
            protect=[("my notes", str(config))],
        )
    assert names(tmp_path / "cfg") == ["config.json"]


def _saved_over(path: Path) -> None:
    """Another program saves a checkpoint into `path` itself, as torch.save(obj, path) does (here with
    the same bytes and size, so the mapped pages stay readable, and a later mtime)."""
    data, stat = path.read_bytes(), path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_checkpoint_changed_after_conversion_is_not_written_by_the_library(tmp_path):
    from converter.pipeline import convert_checkpoint, write_folder

    checkpoint = tmp_path / "mine.pth"
    checkpoint.write_bytes(helpers.checkpoint("tiny-a").read_bytes())
    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    result = convert_checkpoint(checkpoint, config=config)
    _saved_over(checkpoint)
    with pytest.raises(ConverterError, match="mine.pth changed while it was converted .*nothing was written"):
        write_folder(result, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "mine.pth"]


def test_a_checkpoint_moved_renamed_over_or_removed_after_conversion_is_still_written(tmp_path, monkeypatch):
    """The mapped file is as it was read: a new file renamed into its place, its folder removed or the
    current folder changed leave the verified weights as they were."""
    from converter.pipeline import convert_checkpoint, write_folder

    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    for case in ("renamed-over", "removed", "chdir"):
        folder = tmp_path / case
        folder.mkdir()
        checkpoint = folder / "mine.pth"
        checkpoint.write_bytes(helpers.checkpoint("tiny-a").read_bytes())
        monkeypatch.chdir(folder)
        result = convert_checkpoint("mine.pth", config=config)
        if case == "renamed-over":
            (folder / "new.pth").write_bytes(b"another checkpoint")
            os.replace(folder / "new.pth", checkpoint)
        elif case == "removed":
            checkpoint.unlink()
        monkeypatch.chdir(tmp_path)
        assert write_folder(result, tmp_path / f"out-{case}").folder.joinpath("model.safetensors").is_file()


def test_a_provenance_made_without_the_files_identity_is_written(tmp_path):
    """Provenance's identity defaults to None (a result a library user put together): nothing to compare
    the checkpoint with, so the folder is written rather than the check failing on the missing record."""
    from dataclasses import replace

    from converter.pipeline import convert_checkpoint, write_folder

    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    result = convert_checkpoint(helpers.checkpoint("tiny-a"), config=config, verify=False)
    result = replace(result, provenance=replace(result.provenance, identity=None))
    assert write_folder(result, tmp_path / "out").folder.joinpath("model.safetensors").is_file()


def test_a_checkpoint_changed_during_the_conversion_is_not_written(tmp_path, monkeypatch, capsys):
    from converter import pipeline

    checkpoint = tmp_path / "mine.pth"
    checkpoint.write_bytes(helpers.checkpoint("tiny-a").read_bytes())
    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    write_small_files = pipeline.write_small_files

    def while_a_trainer_saves(*args, **kwargs):
        write_small_files(*args, **kwargs)
        _saved_over(checkpoint)

    monkeypatch.setattr(pipeline, "write_small_files", while_a_trainer_saves)
    assert helpers.run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out") == 2
    assert "mine.pth changed while it was converted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg", "mine.pth"]


@pytest.mark.parametrize("output", [".", "..", "sub/..", "sub/../..", "/"])
def test_dot_dotdot_and_the_root_are_refused(tmp_path, monkeypatch, output):
    (tmp_path / "cwd" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ConverterError, match=r"^--output .*: name the folder to write"):
        check_output(Path(output), overwrite=True)


@pytest.mark.parametrize("output", ["{cwd}", "{tmp}", "sub/../../cwd"])
def test_the_current_folder_and_its_ancestors_are_refused(tmp_path, monkeypatch, output):
    (tmp_path / "cwd" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    output = Path(output.format(cwd=tmp_path / "cwd", tmp=tmp_path))
    with pytest.raises(ConverterError, match="is the current folder or holds it"):
        check_output(output, overwrite=True)


@pytest.mark.parametrize("output", ["notes.txt/out", "notes.txt/sub/out"])
def test_an_output_below_a_file_is_refused_naming_the_file(tmp_path, output):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConverterError) as err:
        check_output(tmp_path / output, overwrite=False)
    assert str(err.value) == f"--output {tmp_path / output}: {tmp_path / 'notes.txt'} is a file, not a folder"


def test_a_file_named_with_a_trailing_slash_is_refused(tmp_path):
    """A trailing slash names a folder; Path() drops it, and a file would be written under that name."""
    for given in (f"{tmp_path}/new/", f"{tmp_path}/new{os.sep}"):
        with pytest.raises(
            ConverterError, match=f"^--report {re.escape(given)} names a folder: name the file$"
        ):
            check_target(given, kind="file", overwrite=True, flag="--report")
    assert check_target(f"{tmp_path}/new/", kind="folder", overwrite=False) == tmp_path / "new"


def test_a_path_that_is_not_utf8_is_refused(tmp_path, monkeypatch):
    """safetensors and torch cannot open it: refused before any work, also when only the cwd is not UTF-8."""
    bad = tmp_path / os.fsdecode(b"\xff")
    with pytest.raises(ConverterError, match="^--output .*: the path is not valid UTF-8, which torch"):
        check_output(bad / "out", overwrite=False)
    bad.mkdir()
    monkeypatch.chdir(bad)
    with pytest.raises(ConverterError, match="^--output out: the path is not valid UTF-8"):
        check_output(Path("out"), overwrite=False)


def test_a_broken_symlink_is_refused(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConverterError, match="broken symlink"):
        check_output(tmp_path / "out", overwrite=True)


def test_an_open_file_named_through_proc_is_refused_and_not_replaced(tmp_path):
    """/proc/self/fd/N resolves to the file behind the descriptor (a log the output is redirected to):
    replacing that file is not writing to the stream."""
    log = tmp_path / "run.log"
    log.write_text("earlier output")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        for given in (f"/proc/self/fd/{fd}", f"/proc/{os.getpid()}/fd/{fd}"):
            with pytest.raises(ConverterError, match=f"^--report {given} is a process's open file"):
                check_target(given, kind="file", overwrite=True, flag="--report")
    finally:
        os.close(fd)
    assert log.read_text() == "earlier output"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_mount_point_is_refused_before_any_work(tmp_path, monkeypatch, kind):
    """A mount point cannot be renamed over (EBUSY): said first, not after the conversion."""
    mount = tmp_path / "mnt"
    mount.mkdir() if kind == "folder" else mount.write_text("")
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount)
    with pytest.raises(ConverterError, match="is a mount point, which cannot be replaced: name a"):
        check_target(mount, kind=kind, overwrite=True)
    assert check_target(mount.parent / "other", kind=kind, overwrite=True) == mount.parent / "other"


def test_a_bind_mount_on_the_same_file_system_is_refused_too(tmp_path):
    """os.path.ismount misses it (same device); /proc/self/mountinfo lists it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "mnt with space").mkdir()
    mount = tmp_path / "mnt with space"
    done = subprocess.run(["mount", "--bind", str(tmp_path / "real"), str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode(errors='replace').strip()}")
    try:
        assert not os.path.ismount(mount)
        with pytest.raises(ConverterError, match="is a mount point, which cannot be replaced"):
            check_target(mount, kind="folder", overwrite=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_what_may_be_written_is_accepted_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert check_output(Path("new/out"), overwrite=False) == tmp_path / "new" / "out"
    assert check_output(Path("empty"), overwrite=False) == tmp_path / "empty"
    assert check_output(Path("full"), overwrite=True) == tmp_path / "full"
    with pytest.raises(ConverterError, match="not empty; pass --overwrite"):
        check_output(Path("full"), overwrite=False)


# --- moving into place -----------------------------------------------------------------------------


def test_the_staging_folder_names_its_owner_and_honours_the_umask(tmp_path, rename):
    previous = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out", overwrite=False) as folder:
            assert folder.name.startswith(f".out.partial-{os.getpid()}-")
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # mkdtemp would give 0o700
            with weights_written_meanwhile(folder, WEIGHTS):
                (folder / "sub").mkdir(mode=0o700)
                fd = os.open(folder / "sub" / "secret.json", os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, WEIGHTS_NAME: 0o644, "sub": 0o755, "sub/secret.json": 0o644}


def test_a_strict_umask_is_honoured_too(tmp_path):
    previous = os.umask(0o077)
    try:
        with (
            staged_output(tmp_path / "out", overwrite=False) as folder,
            weights_written_meanwhile(folder, WEIGHTS),
        ):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "out" / WEIGHTS_NAME).stat().st_mode) == 0o600


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP])
def test_a_filesystem_without_modes_is_written_all_the_same(tmp_path, monkeypatch, code):
    """FAT, exFAT and SMB mounts (a USB stick, a shared drive) refuse chmod: the output is written."""

    def refused(path, mode, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(os, "chmod", refused)
    with staged_output(tmp_path / "out", overwrite=False) as folder:
        (folder / "config.json").write_text("{}")
    assert names(tmp_path / "out") == ["config.json"]


def test_overwrite_replaces_only_once_the_new_folder_is_complete(tmp_path, rename):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_output(out, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        assert names(out) == ["old.txt"]  # untouched while the run is going
    assert names(out) == ["new.txt"] and names(tmp_path) == ["out"]


def test_an_old_folder_that_cannot_be_removed_entirely_is_named(tmp_path, rename, monkeypatch, caplog):
    """Write-protected files in the old output (a user's chmod -R a-w): the new one is in place, and the
    rest of the old one, hidden beside it under a staging name, is named for the user to remove."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # removes nothing
    with staged_output(out, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert names(out) == ["new.txt"]
    (left,) = [p for p in tmp_path.iterdir() if p != out]
    assert names(left) == ["old.txt"]
    assert (
        f"could not be removed entirely: what is left of it is at {left}; remove it yourself" in caplog.text
    )


def test_an_output_given_through_a_symlink_is_replaced_where_it_lives(tmp_path, rename):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with staged_output(tmp_path / "link", overwrite=True) as folder:
        assert folder.parent == tmp_path
        (folder / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and names(tmp_path / "link") == ["new.txt"]
    assert names(tmp_path) == ["link", "real"]


def test_an_empty_output_is_replaced_without_overwrite(tmp_path, rename):
    (tmp_path / "out").mkdir()
    with staged_output(tmp_path / "out", overwrite=False) as folder:
        (folder / "new.txt").write_text("new")
    assert names(tmp_path / "out") == ["new.txt"] and names(tmp_path) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("what", ["empty folder", "folder with a file", "file"])
def test_an_output_that_appears_during_the_run_is_not_clobbered(tmp_path, rename, overwrite, what):
    out = tmp_path / "out"
    with pytest.raises(ConverterError, match="appeared or changed while converting") as err:
        with staged_output(out, overwrite=overwrite) as folder:
            (folder / "new.txt").write_text("new")
            if what == "file":
                out.write_text("user's")
            else:
                out.mkdir()
                if what == "folder with a file":
                    (out / "user.txt").write_text("user's")
    assert ("with --overwrite" in str(err.value)) is not overwrite
    assert names(tmp_path) == ["out"]
    if what == "file":
        assert out.read_text() == "user's"
    else:
        assert names(out) == (["user.txt"] if what == "folder with a file" else [])


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_added_to_the_old_output_during_the_run_is_kept(tmp_path, rename, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    if overwrite:
        (out / "old.txt").write_text("old")
    with pytest.raises(ConverterError, match="appeared or changed while converting"):
        with staged_output(out, overwrite=overwrite) as folder:
            (folder / "new.txt").write_text("new")
            (out / "user.txt").write_text("user's")
    assert names(out) == (["old.txt", "user.txt"] if overwrite else ["user.txt"])
    assert names(tmp_path) == ["out"]


def test_an_output_replaced_by_another_folder_during_the_run_is_kept(tmp_path, rename):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConverterError, match="appeared or changed while converting"):
        with staged_output(out, overwrite=True) as folder:
            (folder / "new.txt").write_text("new")
            os.rename(out, tmp_path / "moved")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert names(out) == ["theirs.txt"] and names(tmp_path) == ["moved", "out"]


def test_an_old_folder_that_cannot_be_put_back_is_never_removed(tmp_path, monkeypatch):
    """Exchanged with ours, the old folder lies at the staging path: should exchanging it back fail, the
    cleanup of the staging path leaves it there, where the message says it is."""
    if export._libc_renameat2 is None:
        pytest.skip("no renameat2 in this C library")
    renameat2, exchanges = export._renameat2, []

    def second_exchange_fails(src: Path, dst: Path, flags: int) -> bool:
        if flags == export._RENAME_EXCHANGE:
            exchanges.append(dst)
            if len(exchanges) == 2:  # the exchange back
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return renameat2(src, dst, flags)

    monkeypatch.setattr(export, "_renameat2", second_exchange_fails)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConverterError) as err:
        with staged_output(out, overwrite=True) as folder:
            (folder / "new.txt").write_text("new")
            (out / "theirs.txt").write_text("theirs")  # changed meanwhile: to be put back, and it cannot
    assert str(err.value) == (
        f"--output {out} changed while converting and could not be put back: the folder that was there "
        f"is now {folder} (Input/output error)"
    )
    assert names(folder) == ["old.txt", "theirs.txt"]


_RACER = """
import sys, time
from pathlib import Path
from converter import export
from converter.errors import ConverterError

out, me, go, overwrite, impl = sys.argv[1:]
out, go, overwrite = Path(out), Path(go), overwrite == "1"
if impl == "fallback":
    export._libc_renameat2 = None
try:
    with export.staged_output(out, overwrite) as folder:
        (folder / "who").write_text(me)
        print("ready", flush=True)
        while not go.exists():
            time.sleep(0.001)
except ConverterError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_racing_runs_exactly_one_wins(tmp_path, rename, overwrite):
    """Two real processes stage the same output, then both move into place at the same moment."""
    work, go = tmp_path / "work", tmp_path / "go"
    work.mkdir()
    out = work / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old")
    racers = {
        me: subprocess.Popen(
            [sys.executable, "-c", _RACER, str(out), me, str(go), str(int(overwrite)), rename],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in ("a", "b")
    }
    for racer in racers.values():
        assert racer.stdout.readline() == "ready\n"
    go.touch()
    codes = {me: racer.wait(timeout=60) for me, racer in racers.items()}
    errors = {me: racer.stderr.read() for me, racer in racers.items()}
    assert sorted(codes.values()) == [0, 2], errors
    winner = min(codes, key=codes.get)
    loser = max(codes, key=codes.get)
    assert "appeared or changed while converting" in errors[loser] and "Traceback" not in errors[loser]
    assert names(out) == ["who"] and (out / "who").read_text() == winner
    assert names(work) == ["out"]


@pytest.mark.parametrize("then", ["released", "interrupted"])
def test_a_run_waits_to_move_into_place_while_another_is_moving_into_the_same_folder(tmp_path, rename, then):
    """Moves into place are serialised by a lock on the parent folder (the fallback's swap is several
    renames that two runs could interleave); waiting for it can still be interrupted."""
    work, go = tmp_path / "work", tmp_path / "go"
    work.mkdir()
    out = work / "out"
    holder = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        racer = subprocess.Popen(
            [sys.executable, "-c", _RACER, str(out), "a", str(go), "0", rename],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert racer.stdout.readline() == "ready\n"
        go.touch()
        time.sleep(1.0)
        assert racer.poll() is None and not out.exists()  # staged, complete, and waiting
        if then == "interrupted":
            racer.send_signal(signal.SIGINT)
            assert racer.wait(timeout=60) != 0
            assert names(work) == []  # its staging folder went with it
            return
    finally:
        os.close(holder)
    assert racer.wait(timeout=60) == 0, racer.stderr.read()
    assert names(work) == ["out"] and (out / "who").read_text() == "a"


# --- failures and signals leave nothing behind -----------------------------------------------------


def test_a_failure_removes_the_folders_made_for_the_output_unless_something_is_in_them(tmp_path):
    (tmp_path / "a").mkdir()
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(ConverterError, match="^failed$"):
        with staged_output(out, overwrite=False):
            raise ConverterError("failed")
    assert names(tmp_path) == ["a"] and names(tmp_path / "a") == []  # a was there before
    with pytest.raises(Interrupted):
        with staged_output(out, overwrite=False):
            (tmp_path / "a" / "b" / "theirs").write_text("x")  # another run's, say
            raise Interrupted(signal.SIGINT)
    assert names(tmp_path / "a") == ["b"] and names(tmp_path / "a" / "b") == ["theirs"]


def test_a_move_into_place_that_fails_leaves_no_empty_claim_behind(tmp_path, monkeypatch):
    """Without renameat2 the output's name is claimed with mkdir, then renamed onto: a rename that
    fails (here EIO) gives the claim back, so a failed run leaves nothing."""
    monkeypatch.setattr(export, "_libc_renameat2", None)
    out = tmp_path / "out"
    rename = os.rename

    def rename_fails_onto_the_output(src: object, dst: object) -> None:
        if Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_onto_the_output)
    with pytest.raises(ConverterError, match=f"^--output {out}: cannot move it into place: Input/output"):
        with staged_output(out, overwrite=False) as folder:
            (folder / "config.json").write_text("{}")
    assert names(tmp_path) == []


def test_an_oserror_in_the_block_names_the_output_file_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConverterError) as err:
        with staged_output(out, overwrite=False) as folder:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "config.json"))
    assert str(err.value) == (
        f"could not write {out / 'config.json'}: No space left on device; --output {out} was not changed"
    )
    assert names(tmp_path) == []


def test_a_failed_copy_names_the_file_it_was_writing_not_its_source(tmp_path):
    """shutil.copyfile's error names the source first and the destination second."""
    out, source = tmp_path / "out", tmp_path / "cache" / "tokenizer.json"
    source.parent.mkdir()
    source.write_text("{}")
    with pytest.raises(ConverterError) as err:
        with staged_output(out, overwrite=False) as folder:
            raise OSError(
                errno.ENOSPC, "No space left on device", str(source), None, str(folder / source.name)
            )
    assert str(err.value) == (
        f"could not write {out / 'tokenizer.json'}: No space left on device; --output {out} was not changed"
    )


def test_a_disk_full_weights_write_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    """The patched twin of the tmpfs test below, for machines that cannot mount one."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # a partial file, as a real disk-full leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConverterError, match=f"could not write .*{WEIGHTS_NAME}: No space left on device"):
        with (
            staged_output(tmp_path / "out", overwrite=False) as folder,
            weights_written_meanwhile(folder, WEIGHTS),
        ):
            pass
    assert names(tmp_path) == []


def test_disk_full_while_writing_the_weights(small_disk):
    big = {"w": torch.zeros(1024, 768)}  # 3 MB on a 2 MB disk
    out = small_disk / "out"
    wanted = f"could not write {out}/{WEIGHTS_NAME}: No space left on device; --output {out} was not changed"
    with pytest.raises(ConverterError, match=f"^{re.escape(wanted)}$"):
        with staged_output(out, overwrite=False) as folder, weights_written_meanwhile(folder, big):
            pass
    assert names(small_disk) == []


def test_disk_full_while_writing_a_small_file(small_disk):
    out = small_disk / "out"
    with pytest.raises(ConverterError) as err:
        with staged_output(out, overwrite=False) as folder, weights_written_meanwhile(folder, WEIGHTS):
            (folder / "README.md").write_bytes(b"x" * (3 << 20))
    # a failed write() names no file: the output is named
    assert str(err.value) == f"could not write {out}: No space left on device; --output {out} was not changed"
    assert names(small_disk) == []


def test_a_read_only_filesystem_is_named(small_disk):
    (small_disk / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ConverterError, match=rf"--output {small_disk}/new/out: cannot create .*Read-only"):
        with staged_output(small_disk / "new" / "out", overwrite=False):
            pass
    with pytest.raises(
        ConverterError, match=rf"--output {small_disk}/out: cannot create .*partial.*Read-only"
    ):
        with staged_output(small_disk / "out", overwrite=False):
            pass
    assert names(small_disk) == ["existing"]


def test_interrupted_carries_the_shells_exit_code():
    assert (Interrupted(signal.SIGINT).exit_code, Interrupted(signal.SIGTERM).exit_code) == (130, 143)
    assert str(Interrupted(signal.SIGTERM)) == "interrupted by SIGTERM"


def test_a_signal_during_a_deferred_step_is_raised_after_it(tmp_path):
    steps = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err, signals_as_exceptions():
        with export._signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and did not raise here
            steps.append("finished")
    assert steps == ["finished"] and err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


def test_a_signal_while_moving_into_place_says_the_output_is_complete(tmp_path, rename, monkeypatch):
    """A signal during the move is held until the move is done, then raised: its one line must say that
    the output is there, not that it was not changed."""
    move = export._move_folder

    def move_when_signalled(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now, and held the signal back
        move(*args)

    monkeypatch.setattr(export, "_move_folder", move_when_signalled)
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as err, signals_as_exceptions():
        with staged_output(out, overwrite=False) as folder:
            (folder / "config.json").write_text("{}")
    assert str(err.value) == f"interrupted by SIGTERM; --output {out} was complete first"
    assert names(tmp_path) == ["out"] and names(out) == ["config.json"]


def test_what_a_signal_broke_midway_is_reported_as_the_interruption(capsys):
    """A library interrupted halfway through an import fails with its own error (ModuleNotFoundError)."""
    from converter.cli import run_job

    def job() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:
            raise ModuleNotFoundError("Could not import module 'XCLIPModel'") from None
        return 0

    assert run_job(job) == 143
    assert capsys.readouterr().err == "xclip-convert: interrupted by SIGTERM\n"


def test_a_signal_after_a_swallowed_one_still_interrupts():
    """A library's bare `except:` swallowed the first Ctrl-C: the second one must still stop the run."""
    from converter.cli import run_job

    def job() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:
            pass
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return 0

    assert run_job(job) == 130


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_python_shuts_down_keeps_the_finished_runs_status(signum):
    """A signal after the run said its result (torch takes a moment to unload) ends the process at once,
    with the run's status: not 143 or a KeyboardInterrupt traceback for work that was done."""
    code = (
        "import atexit, os, runpy; "
        f"atexit.register(os.kill, os.getpid(), {int(signum)}); "
        "runpy.run_module('converter', run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code, "--list"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "xclip-base-patch32" in run.stdout, (run.returncode, run.stderr)
    assert run.stderr == "", run.stderr


_WRITER = """
import sys, threading, time
from pathlib import Path
from converter import export
from converter.export import Interrupted, signals_as_exceptions, staged_output, weights_written_meanwhile

out, phase = Path(sys.argv[1]), sys.argv[2]
partly_written = threading.Event()

def slow_write(folder, state_dict, cancel=None):  # a slow disk (no torch: the child starts fast)
    with open(folder / export.WEIGHTS_NAME, "wb") as f:
        f.write(bytes(1 << 20))
        f.flush()
        partly_written.set()
        time.sleep(1.5)
        f.write(bytes(1 << 20))

export.write_weights = slow_write

def main():
    with signals_as_exceptions():
        try:
            with staged_output(out, False) as folder, weights_written_meanwhile(folder, {}):
                partly_written.wait()
                print("ready", flush=True)
                if phase == "block":
                    time.sleep(60)  # verifying, say
                # else the block ends here and the main thread waits for the writer
        except Interrupted as err:
            print(f"xclip-convert: {err}", file=sys.stderr)
            return err.exit_code
    return 0

sys.exit(main())
"""


def start_writer(work: Path, phase: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(work / "out"), phase],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "ready\n", child.stderr.read()
    return child


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("phase", ["block", "waiting for the writer"])
def test_a_signal_mid_write_exits_with_one_line_and_leaves_nothing(tmp_path, signum, code, phase):
    work = tmp_path / "work"
    work.mkdir()
    child = start_writer(work, phase)
    assert any(p.name.startswith(".out.partial-") for p in work.iterdir())  # mid-write, for real
    time.sleep(0.2)
    child.send_signal(signum)
    assert child.wait(timeout=60) == code
    stderr = child.stderr.read()
    name = signal.Signals(signum).name
    assert stderr.splitlines() == [
        f"xclip-convert: interrupted by {name}; --output {work / 'out'} was not changed"
    ]
    assert names(work) == []


def test_a_sigkill_leftover_is_removed_by_the_next_run_and_nothing_else(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    child = start_writer(work, "block")
    child.kill()
    child.wait(timeout=60)
    leftover = [p.name for p in work.iterdir()]
    assert len(leftover) == 1 and leftover[0].startswith(f".out.partial-{child.pid}-")
    others = [".out.partial-notours", ".other.partial-1-0123abcd", f".out.partial-{child.pid}-0123abcd.old"]
    for name in others:
        (work / name).mkdir()
    (work / f".out.partial-{child.pid}-89abcdef").write_text("a file, not a staging folder")
    with staged_output(work / "out", overwrite=False) as folder:
        (folder / "new.txt").write_text("new")
    assert names(work) == sorted(["out", *others, f".out.partial-{child.pid}-89abcdef"])


def test_a_staging_folder_whose_owner_runs_is_kept(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    child = start_writer(work, "block")  # a live run to the same output, still converting
    try:
        theirs = list(work.iterdir())
        with staged_output(work / "out", overwrite=False) as folder:
            (folder / "new.txt").write_text("new")
        assert theirs and all(p.exists() for p in theirs)
    finally:
        child.terminate()
        assert child.wait(timeout=60) == 143
    assert names(work) == ["out"]  # and the other run removed its own staging folder


def test_a_locked_staging_folder_of_a_dead_pid_is_kept(tmp_path):
    """The lock protects a live owner whose pid this process cannot see (another pid namespace)."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    staging = tmp_path / f".out.partial-{int(gone.stdout)}-0123abcd"
    staging.mkdir()
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with staged_output(tmp_path / "out", overwrite=False):
            pass
        assert staging.is_dir()
    finally:
        os.close(fd)
    with staged_output(tmp_path / "out", overwrite=True):
        pass
    assert names(tmp_path) == ["out"]


# --- one file (--to-original): the same staging ----------------------------------------------------


def _dead_pid() -> int:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(gone.stdout)


def test_a_staged_file_names_its_owner_is_locked_and_honours_the_umask(tmp_path):
    out = tmp_path / "back.pth"
    previous = os.umask(0o022)
    try:
        with staged_file(out, overwrite=False) as partial:
            assert partial.parent == tmp_path and partial.name.startswith(f".back.pth.partial-{os.getpid()}-")
            assert stat.S_IMODE(partial.stat().st_mode) == 0o644  # mkstemp would give 0o600
            fd = os.open(partial, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its owner holds it
            finally:
                os.close(fd)
            partial.write_bytes(b"new")
    finally:
        os.umask(previous)
    assert names(tmp_path) == ["back.pth"] and out.read_bytes() == b"new"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_that_appears_during_the_run_is_kept_without_overwrite(tmp_path, overwrite):
    out = tmp_path / "back.pth"
    run = staged_file(out, overwrite)
    if overwrite:
        with run as partial:
            partial.write_bytes(b"new")
            out.write_bytes(b"user's")
        assert out.read_bytes() == b"new"
    else:
        with pytest.raises(ConverterError, match="exists; pass --overwrite"), run as partial:
            partial.write_bytes(b"new")
            out.write_bytes(b"user's")
        assert out.read_bytes() == b"user's"
    assert names(tmp_path) == ["back.pth"]


@pytest.mark.parametrize(("make", "what"), [(os.mkfifo, "a FIFO"), (os.mkdir, "a folder")])
def test_what_is_no_file_that_appears_during_the_run_is_kept_with_overwrite(tmp_path, make, what):
    """--overwrite replaces a file, never a FIFO (a reader waits on it) or a folder put there meanwhile."""
    out = tmp_path / "back.pth"
    with pytest.raises(ConverterError) as err, staged_file(out, overwrite=True) as partial:
        partial.write_bytes(b"new")
        make(out)
    assert str(err.value) == f"--output {out} became {what} while writing; it was left as it is"
    assert what_is_there(out) == what and names(tmp_path) == ["back.pth"]


def test_a_failed_or_interrupted_staged_file_leaves_nothing(tmp_path):
    out = tmp_path / "back.pth"
    with pytest.raises(ConverterError, match=f"could not write {out}: No space left on device"):
        with staged_file(out, overwrite=False) as partial:
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))
    with pytest.raises(Interrupted) as err, signals_as_exceptions():
        with staged_file(out, overwrite=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert err.value.outcome == f"--output {out} was not changed"
    assert names(tmp_path) == []


def test_a_killed_runs_partial_file_is_removed_by_the_next_run_and_nothing_else(tmp_path):
    pid = _dead_pid()
    leftover = tmp_path / f".back.pth.partial-{pid}-0123abcd"
    leftover.write_bytes(b"half a checkpoint")
    kept = [
        f".back.pth.partial-{pid}-89abcdef",  # a folder: the folder staging's kind, not this one's
        f".back.pth.partial-{os.getpid()}-0123abcd",  # its owner runs
        f".other.pth.partial-{pid}-0123abcd",  # another output's
    ]
    (tmp_path / kept[0]).mkdir()
    for name in kept[1:]:
        (tmp_path / name).write_bytes(b"not ours to remove")
    with staged_file(tmp_path / "back.pth", overwrite=False) as partial:
        partial.write_bytes(b"new")
    assert names(tmp_path) == sorted(["back.pth", *kept])


def test_without_a_home_folder_a_local_conversion_works_and_a_download_says_what_to_set(
    tmp_path, monkeypatch, capsys
):
    """HOME unset and a user id without a passwd entry (a container's): Path.home() raises."""
    from converter import fetch

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    monkeypatch.delenv("XCLIP_CACHE")
    config = helpers.write_config("tiny-a", tmp_path / "cfg")
    assert (
        helpers.run(
            "--checkpoint", helpers.checkpoint("tiny-a"), "--config", config, "--output", tmp_path / "o"
        )
        == 0
    )
    assert (tmp_path / "o" / "model.safetensors").is_file()
    with pytest.raises(ConverterError, match="no home folder to keep the download cache in: set XCLIP_CACHE"):
        fetch.fetch_url("http://127.0.0.1:9/k.pth")


def test_a_name_that_leaves_no_room_for_its_staging_entry_says_how_long_it_may_be(tmp_path):
    """NAME_MAX is 255 bytes; the staging entry beside the output adds its owner's pid and a tag."""
    out = tmp_path / ("a" * 240)
    with pytest.raises(
        ConverterError, match=r"the name is too long for the staging entry beside it, which adds"
    ):
        with staged_output(out, overwrite=False):
            pass
    assert names(tmp_path) == []


def test_a_name_of_exactly_name_max_bytes_is_told_how_long_it_may_be(tmp_path):
    """255 bytes is a name the file system takes: only its staging entry's does not fit."""
    out = tmp_path / ("é" * 127 + "a")  # 255 bytes, 128 characters
    extra = len(f"..partial-{os.getpid()}-0123abcd.old")  # a dot before, the rest after; ".old" when swapped
    with pytest.raises(
        ConverterError, match=f"which adds {extra} bytes: choose a name of at most {255 - extra}$"
    ):
        with staged_output(out, overwrite=False):
            pass
    assert names(tmp_path) == []
