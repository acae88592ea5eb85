"""Writing the output folder: atomic, weights written on a second thread and read back, and the
cached processor files equal a fresh build."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converter import export
from converter.errors import ConverterError
from converter.export import (
    WEIGHTS_NAME,
    check_written,
    staged_output,
    weights_written_meanwhile,
    write_weights,
)
from converter.processor_files import build_processor_files, write_processor


def test_failed_write_leaves_no_output_and_no_staging(tmp_path):
    with pytest.raises(ConverterError), staged_output(tmp_path / "out", overwrite=False) as folder:
        (folder / "config.json").write_text("{}")
        raise ConverterError("disk full, say")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True):
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConverterError, match="not a folder"), staged_output(tmp_path / "out", overwrite=True):
        pass


def test_an_os_error_is_named_a_write_only_in_the_staging(tmp_path):
    """A read of an input that fails in the block is no failure to write: named as the read it was."""
    source = tmp_path / "source.json"
    with pytest.raises(ConverterError) as failed, staged_output(tmp_path / "out", overwrite=False) as folder:
        (folder / "config.json").write_text("{}")
        source.read_text()
    unchanged = f"--output {tmp_path / 'out'} was not changed"
    assert str(failed.value) == f"{source}: No such file or directory; {unchanged}"
    with pytest.raises(ConverterError, match="^could not write .*out/sub/x: No such file"):
        with staged_output(tmp_path / "out", overwrite=False) as folder:
            (folder / "sub" / "x").write_text("{}")


WEIGHTS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, 2).t()}  # b: a transposed view


@pytest.fixture
def slow_writes(monkeypatch):
    """Delay every weights write, so a block that ended without waiting for it would be caught."""
    finished = []
    write_weights = export.write_weights

    def slow_write_weights(folder, state_dict, cancel=None):
        time.sleep(0.3)
        try:
            write_weights(folder, state_dict, cancel)
        finally:
            finished.append(folder)

    monkeypatch.setattr(export, "write_weights", slow_write_weights)
    return finished


def test_weights_written_meanwhile_are_complete_when_the_block_ends(tmp_path, slow_writes):
    with weights_written_meanwhile(tmp_path, WEIGHTS):
        pass
    assert slow_writes == [tmp_path]
    written = load_file(tmp_path / WEIGHTS_NAME)
    assert written.keys() == WEIGHTS.keys() and all(torch.equal(written[k], WEIGHTS[k]) for k in WEIGHTS)


def test_a_failed_weights_write_names_the_file(tmp_path):
    (tmp_path / WEIGHTS_NAME).mkdir()  # the write cannot open it
    with pytest.raises(ConverterError, match=f"could not write {tmp_path / WEIGHTS_NAME}: .*directory"):
        with weights_written_meanwhile(tmp_path, WEIGHTS):
            pass


def test_the_blocks_own_error_wins_and_the_writer_is_waited_for(tmp_path, slow_writes):
    (tmp_path / WEIGHTS_NAME).mkdir()  # the write fails too, after the block has failed
    with pytest.raises(RuntimeError, match="verification failed, say"):
        with weights_written_meanwhile(tmp_path, WEIGHTS):
            raise RuntimeError("verification failed, say")
    assert slow_writes == [tmp_path]  # nothing still writing into a folder about to be removed


def test_a_failed_block_leaves_the_weights_unread(tmp_path, slow_writes, monkeypatch):
    """The block's failure abandons the output: the writer is waited for, but skips the read-back (a pass
    over every byte of the model, seconds for a large one, after a Ctrl-C)."""
    reads = []
    monkeypatch.setattr(export, "check_written", lambda *args: reads.append(args))
    with pytest.raises(RuntimeError, match="verification failed, say"):
        with weights_written_meanwhile(tmp_path, WEIGHTS):
            raise RuntimeError("verification failed, say")
    assert slow_writes == [tmp_path] and reads == []


@pytest.mark.parametrize("image_size", [224, 336])
def test_cached_processor_files_equal_a_fresh_build(tmp_path, monkeypatch, image_size):
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    build_processor_files(fresh, image_size)  # what a cache miss writes
    for attempt in ("first", "cached"):
        folder = tmp_path / attempt
        folder.mkdir()
        write_processor(folder, image_size)
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in fresh.iterdir())
        for file in fresh.iterdir():
            assert (folder / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_cached_processor_entry_missing_a_file_is_rebuilt(tmp_path, monkeypatch):
    """A cache cleaner that takes some of an entry's files: the next conversion's folder is whole."""
    from converter.processor_files import FILES

    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    write_processor(tmp_path / "first", 224)
    for name in FILES:
        next((tmp_path / "cache" / "processor").glob(f"224-*/{name}")).unlink()
        folder = tmp_path / name
        folder.mkdir()
        write_processor(folder, 224)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in (tmp_path / "first").iterdir()
        )


@pytest.mark.parametrize("change", ["edited", "digests-lost"])
def test_a_cached_processor_entry_changed_since_it_was_built_is_rebuilt(tmp_path, monkeypatch, change):
    """An edited or corrupted cached file would be copied into every later conversion's folder."""
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    write_processor(tmp_path / "first", 224)
    entry = _processor_entry(tmp_path / "cache")
    if change == "edited":
        (entry / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    else:
        (entry / "sha256.json").unlink()
    (tmp_path / "out").mkdir()
    write_processor(tmp_path / "out", 224)
    for file in (tmp_path / "first").iterdir():
        assert (tmp_path / "out" / file.name).read_bytes() == file.read_bytes(), file.name
    assert (entry / "tokenizer_config.json").read_bytes() == (
        tmp_path / "first" / "tokenizer_config.json"
    ).read_bytes()


def test_a_processor_cache_removed_while_it_is_built_leaves_the_files_built_in_place(tmp_path, monkeypatch):
    """The tokenizers library fails with a bare Exception when its folder vanishes (a cache cleaner)."""
    from converter import processor_files

    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    build_processor_files(fresh, 224)
    build = processor_files.build_processor_files

    def cache_removed_meanwhile(folder: Path, image_size: int) -> None:
        if (tmp_path / "cache") in folder.parents:
            raise Exception("No such file or directory (os error 2)")
        build(folder, image_size)

    monkeypatch.setattr(processor_files, "build_processor_files", cache_removed_meanwhile)
    (tmp_path / "out").mkdir()
    write_processor(tmp_path / "out", 224)
    for file in fresh.iterdir():
        assert (tmp_path / "out" / file.name).read_bytes() == file.read_bytes(), file.name


def _processor_entry(cache: Path) -> Path:
    """The one processor-cache entry a test made (not its lock file)."""
    return next(p for p in (cache / "processor").glob("224-*") if p.suffix != ".lock")


def test_only_the_processor_files_of_a_cache_entry_are_copied(tmp_path, monkeypatch):
    """Whatever else is in an entry (weights, a config, a link to a secret, a FIFO, a folder) stays out."""
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    write_processor(tmp_path / "first", 224)
    entry = _processor_entry(tmp_path / "cache")
    (entry / WEIGHTS_NAME).write_bytes(b"zeros")
    (entry / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "secret.txt").write_text("secret")
    (entry / "special_tokens_map.json").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(entry / "added_tokens.json")
    (entry / "sub").mkdir()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text("verified")
    write_processor(folder, 224)
    assert (folder / "config.json").read_text() == "verified"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", *os.listdir(tmp_path / "first")]
    )


def test_a_cache_entry_that_is_a_link_is_never_replaced(tmp_path, monkeypatch):
    """A link to a folder of the user's: building the entry in place of it would replace that folder."""
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "first").mkdir()
    write_processor(tmp_path / "first", 224)
    entry = _processor_entry(tmp_path / "cache")
    shutil.rmtree(entry)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    entry.symlink_to(tmp_path / "mine")
    (tmp_path / "out").mkdir()
    write_processor(tmp_path / "out", 224)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "first"))


def test_a_cache_entry_locked_too_long_is_built_in_place(tmp_path, monkeypatch, caplog):
    """Another run holds the entry's lock (stopped with Ctrl-Z, say): this one does not wait forever."""
    import logging

    from filelock import FileLock

    from converter import processor_files

    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(processor_files, "LOCK_TIMEOUT", 0.1)
    (tmp_path / "first").mkdir()
    write_processor(tmp_path / "first", 224)
    entry = _processor_entry(tmp_path / "cache")
    shutil.rmtree(entry)
    (tmp_path / "out").mkdir()
    done = threading.Event()

    held = threading.Event()

    def hold() -> None:
        with FileLock(f"{entry}.lock"):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        with caplog.at_level(logging.INFO, logger="converter"):
            write_processor(tmp_path / "out", 224)
    finally:
        done.set()
        holder.join()
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "first"))
    assert "the processor cache is busy" in caplog.text


# --- reading model.safetensors back ----------------------------------------------------------------

MIXED = {
    "f32": torch.randn(5, 7),
    "t": torch.randn(7, 5).t(),  # a transposed view, as the mapping produces
    "f16": torch.randn(4).half(),
    "bf16": torch.randn(4).bfloat16(),
    "nan": torch.tensor([float("nan"), -0.0, 1.0]),
    "t_nan": torch.tensor([[float("nan"), -0.0], [1.0, 2.0]]).t(),  # compared without memcmp
    "scalar": torch.tensor(3.0),
    "ints": torch.arange(5),
}


def written(tmp_path, state_dict=MIXED):
    write_weights(tmp_path, state_dict)
    return tmp_path / WEIGHTS_NAME


@pytest.mark.parametrize("batch_bytes", [1, 64 << 20])
def test_what_was_written_reads_back_equal(tmp_path, batch_bytes):
    check_written(written(tmp_path), MIXED, batch_bytes=batch_bytes)  # NaN equals its own bits


def altered(key, value):
    return {**MIXED, key: value}


@pytest.mark.parametrize(
    ("expected", "what"),
    [
        (
            altered(
                "f32", MIXED["f32"].clone().index_put_((torch.tensor(4), torch.tensor(6)), torch.tensor(9.0))
            ),
            "'f32' has different values",
        ),
        (altered("t", (MIXED["t"].t() + 1e-6).t()), "'t' has different values"),  # a transposed view
        (altered("nan", torch.tensor([float("nan"), 0.0, 1.0])), "'nan' has different values"),  # -0.0 vs 0.0
        (
            altered("t_nan", torch.tensor([[float("nan"), 0.0], [1.0, 2.0]]).t()),
            "'t_nan' has different values",
        ),
        (altered("f16", MIXED["f16"].float()), "'f16' has dtype torch.float16 instead of torch.float32"),
        (altered("f32", MIXED["f32"].reshape(7, 5)), "'f32' has shape (5, 7) instead of (7, 5)"),
        ({k: v for k, v in MIXED.items() if k != "ints"}, "'ints' was not meant to be there"),
        ({**MIXED, "more": torch.ones(1)}, "'more' is missing"),
    ],
)
@pytest.mark.parametrize("batch_bytes", [1, 64 << 20])
def test_a_difference_on_disk_is_named(tmp_path, expected, what, batch_bytes):
    path = written(tmp_path)
    with pytest.raises(ConverterError) as err:
        check_written(path, expected, batch_bytes=batch_bytes)
    assert str(err.value) == f"{path} read back does not hold the verified weights: {what}"


def test_the_read_back_reopens_the_file_after_each_batch_of_bytes(tmp_path, monkeypatch):
    """Mapped pages count towards the RSS until the file is closed: reading back a batch at a time (a
    large tensor by rows) keeps the peak a batch above the model, not the model's size above it."""
    import safetensors

    four = {k: torch.zeros(16) for k in "abcd"}  # 64 bytes each: two batches of 128
    big = {"rows": torch.zeros(8, 16)}  # 512 bytes: four batches of 2 rows
    path = written(tmp_path, {**four, **big})
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda *args, **kwargs: opened.append(1) or real_open(*args, **kwargs)
    )
    check_written(path, {**four, **big}, batch_bytes=128)
    assert len(opened) == 1 + 2 + 4  # the keys, then each batch


def test_a_flipped_byte_in_the_file_is_caught(tmp_path):
    path = written(tmp_path, {"a": torch.zeros(100), "b": torch.zeros(100)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ConverterError, match="'b' has different values"):
        check_written(path, {"a": torch.zeros(100), "b": torch.zeros(100)}, batch_bytes=1)


def test_a_writer_that_writes_other_bytes_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    """What the read-back is for: bytes on disk that are not the verified tensors, even under
    --no-verify, stop the run before anything is moved into place."""
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def off_by_one_ulp(tensors, filename, metadata=None):
        tensors = dict(tensors)
        tensors["a"] = torch.nextafter(tensors["a"], torch.tensor(float("inf")))
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", off_by_one_ulp)
    out = tmp_path / "out"
    with pytest.raises(ConverterError) as err:
        with staged_output(out, overwrite=False) as folder, weights_written_meanwhile(folder, WEIGHTS):
            pass
    assert str(err.value) == (
        f"{out / WEIGHTS_NAME} read back does not hold the verified weights: 'a' has different values; "
        f"--output {out} was not changed"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_abandoned_write_is_not_read_back(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(export, "check_written", lambda *args: reads.append(args))
    cancel = threading.Event()
    write_weights(tmp_path, WEIGHTS, cancel)
    cancel.set()
    write_weights(tmp_path, WEIGHTS, cancel)
    assert len(reads) == 1
