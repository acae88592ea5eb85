"""Writing the output folder: atomic, weights written on a second thread, and the cached processor
files equal a fresh build."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

from converter import export
from converter.errors import ConverterError
from converter.export import WEIGHTS_NAME, staged_output, weights_written_meanwhile
from converter.processing import build_processor
from converter.processor_files import write_processor


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


@pytest.mark.parametrize("image_size", [224, 336])
def test_cached_processor_files_equal_a_fresh_build(tmp_path, monkeypatch, image_size):
    monkeypatch.setenv("XCLIP_CACHE", str(tmp_path / "cache"))
    fresh = tmp_path / "fresh"
    build_processor(image_size).save_pretrained(fresh)
    for attempt in ("first", "cached"):
        folder = tmp_path / attempt
        folder.mkdir()
        write_processor(folder, image_size)
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in fresh.iterdir())
        for file in fresh.iterdir():
            assert (folder / file.name).read_bytes() == file.read_bytes(), file.name
