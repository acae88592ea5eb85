"""Writing the output folder: atomic, and the cached processor files equal a fresh build."""

from __future__ import annotations

import pytest

from converter.errors import ConverterError
from converter.export import write_atomically, write_processor
from converter.processing import build_processor


def test_failed_write_leaves_no_output_and_no_staging(tmp_path):
    out = tmp_path / "out"

    def write(folder):
        (folder / "config.json").write_text("{}")
        raise ConverterError("disk full, say")

    with pytest.raises(ConverterError):
        write_atomically(out, overwrite=False, write=write)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        write_atomically(
            out, overwrite=True, write=lambda folder: (_ for _ in ()).throw(RuntimeError("boom"))
        )
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConverterError, match="not a folder"):
        write_atomically(tmp_path / "out", overwrite=True, write=lambda folder: None)


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
