"""Safe loading: weights only, a narrow allow-list, every accepted layout, clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import ConverterError
from converter.load import load_checkpoint
from tests import helpers


@pytest.fixture(scope="module")
def reference():
    return load_checkpoint(helpers.checkpoint("tiny-a"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_training_layout_with_yacs_config_loads_without_yacs(reference):
    with pytest.raises(ModuleNotFoundError):
        import yacs  # noqa: F401
    assert_same(load_checkpoint(helpers.checkpoint("tiny-a-training-layout")), reference)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "model", "state_dict", "module-prefix", "model-module-prefix"],
)
def test_accepted_layouts(reference, tmp_path, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(reference), path)
    assert_same(load_checkpoint(path), reference)


def test_legacy_non_zip_format(reference, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(reference, path, _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(path), reference)


def test_safetensors_and_half_precision(reference, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.half() for k, v in reference.items()}, path)
    loaded = load_checkpoint(path)
    assert loaded["logit_scale"].dtype == torch.float16
    assert_same(loaded, {k: v.half() for k, v in reference.items()})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    assert "system" in str(err.value) and "allow-list" in str(err.value)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConverterError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "cannot read checkpoint"),
        (b"not a checkpoint at all", "cannot read checkpoint"),
    ],
)
def test_garbage_gives_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ConverterError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_suggests_refetch(tmp_path):
    data = helpers.checkpoint("tiny-a").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConverterError, match="--force-download"):
        load_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(ConverterError, match="not a state dict"):
        load_checkpoint(path)


def test_already_converted_checkpoint_is_recognised(tmp_path):
    path = tmp_path / "hf.safetensors"
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4)}, path)
    with pytest.raises(ConverterError, match="already converted"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConverterError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
