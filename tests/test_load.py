"""Safe loading: weights only, a narrow allow-list, every accepted layout, clear errors."""

from __future__ import annotations

import pickle
import sys
import warnings

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


def test_training_layout_with_yacs_config_loads_without_yacs(reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "yacs", None)  # as if yacs were not installed, whatever this machine has
    monkeypatch.setitem(sys.modules, "yacs.config", None)
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


def _save_zip(obj, path):
    torch.save(obj, path)


def _save_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _save_raw_pickle(obj, path):
    path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize("save", [_save_zip, _save_legacy, _save_raw_pickle], ids=["zip", "legacy", "raw"])
def test_malicious_pickle_is_refused_naming_the_global_and_not_executed(tmp_path, save):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "allow-list" in message and ("posix.system" in message or "os.system" in message), message
    assert "weights_only" not in message  # never torch's advice to load unsafely
    assert not marker.exists()


def _save_safetensors(obj, path):
    save_file({k: v.clone() for k, v in obj["model"].items()}, path)


@pytest.mark.parametrize(
    "save, name",
    [
        (_save_safetensors, "ckpt.pth"),
        (_save_safetensors, "weights"),  # a URL's last component, cached under that name
        (_save_zip, "ckpt.safetensors"),  # torch.load itself reads a path so named as safetensors
        (_save_legacy, "ckpt.safetensors"),
    ],
    ids=["safetensors-as-pth", "safetensors-no-suffix", "zip-as-safetensors", "legacy-as-safetensors"],
)
def test_the_format_is_told_by_content_not_by_name(reference, tmp_path, save, name):
    path = tmp_path / name
    save({"model": reference}, path)
    assert_same(load_checkpoint(path), reference)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"not a checkpoint at all", "cannot read checkpoint"),
        (bytes(range(256)) * 40, "cannot read checkpoint"),
        (b"<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>", "web page"),
    ],
    ids=["empty", "text", "random-bytes", "html"],
)
def test_garbage_gives_a_clear_error_in_our_own_words(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ConverterError, match=message) as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)


def test_a_web_page_with_a_byte_order_mark_is_named_a_web_page(tmp_path):
    """Some servers begin an HTML error page with a UTF-8 byte order mark: still a web page."""
    path = tmp_path / "bad.pth"
    path.write_bytes(b"\xef\xbb\xbf\n<!DOCTYPE html><html><title>Quota exceeded</title></html>")
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(
        f"{path}: cannot read checkpoint: it is a web page (HTML), not a checkpoint"
    )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd: {**sd, "module.logit_scale": sd["logit_scale"]}, "collide"),
        (lambda sd: {**sd, 3: torch.zeros(1)}, "keys must be strings"),
        (lambda sd: {**sd, "logit_scale": torch.tensor(4)}, r"logit_scale \(dtype int64\)"),
        (lambda sd: {**sd, "logit_scale": torch.tensor(4.0 + 1j)}, r"logit_scale \(dtype complex64\)"),
        (lambda sd: {**sd, "ln_final.bias": torch.zeros(32).to_sparse()}, r"ln_final.bias \(sparse"),
        (lambda sd: {**sd, "ln_final.bias": torch.full((32,), float("nan"))}, r"ln_final.bias \(32 of 32\)"),
        (lambda sd: {**sd, "ln_final.bias": torch.tensor([1.0, float("inf")] * 16)}, r"\(16 of 32\)"),
    ],
    ids=["collision", "int-key", "int-tensor", "complex", "sparse", "nan", "inf"],
)
def test_unusable_contents_are_refused_by_name(reference, tmp_path, mutate, message):
    path = tmp_path / "bad.pth"
    torch.save({"model": mutate(dict(reference))}, path)
    with pytest.raises(ConverterError, match=message):
        load_checkpoint(path)


def test_half_precision_weights_whose_sum_overflows_are_finite(reference, tmp_path):
    """The cheap test sums each tensor; in float16 100,000 ones sum to inf. Only a count of non-finite
    values refuses: else every large half-precision checkpoint would be called damaged."""
    path = tmp_path / "half.pth"
    torch.save({"model": {**reference, "big": torch.ones(100_000, dtype=torch.float16)}}, path)
    assert torch.isinf(torch.ones(100_000, dtype=torch.float16).sum())
    assert load_checkpoint(path)["big"].dtype == torch.float16


def test_an_empty_state_dict_is_named(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"model": {}, "epoch": 3}, path)
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    assert str(err.value) == f"{path}: the state dict is empty"


def test_meta_tensors_are_refused_by_name(reference):
    from converter.load import check_kinds

    with pytest.raises(ConverterError, match=r"logit_scale \(a meta tensor"):
        check_kinds({**reference, "logit_scale": torch.empty((), device="meta")})


def test_a_folder_is_not_reported_missing(tmp_path):
    with pytest.raises(ConverterError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_truncated_checkpoint_suggests_refetch(tmp_path):
    data = helpers.checkpoint("tiny-a").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConverterError, match="--force-download"):
        load_checkpoint(path)


def _checkpoint_bytes(tmp_path, legacy: bool) -> bytes:
    path = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.ones(64, 64)}}, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda tmp: _checkpoint_bytes(tmp, False)[:-100],
            "a zip archive (PyTorch's format) whose end is missing",
        ),
        (lambda tmp: _checkpoint_bytes(tmp, True)[:150], "it ends in the middle of its pickled data"),
        (lambda tmp: pickle.dumps({"model": {"w": [0.5] * 50}}, protocol=2)[:60], "ends in the middle"),
        (lambda tmp: _checkpoint_bytes(tmp, True)[:-2000], "the tensor data after its pickled structure"),
        (lambda tmp: pickle.dumps({"model": {"w": 1}}, protocol=5), "a plain pickle (protocol 5)"),
        (
            lambda tmp: b"epoch 3\nmodel weights\n",
            "neither a PyTorch zip archive or pickle nor a safetensors",
        ),
    ],
    ids=["zip-cut", "legacy-cut-mid-pickle", "pickle-cut", "legacy-cut-in-tensors", "pickle-refused", "text"],
)
def test_an_unreadable_checkpoint_is_explained_in_words(tmp_path, make, message):
    """Not torch's `(101)`, `(pop from empty list)` or `(Weights only load failed)`: what the file is
    and what to do, found by looking at the file."""
    path = tmp_path / "bad.pth"
    path.write_bytes(make(tmp_path))
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert text.startswith(f"{path}: cannot read checkpoint: ") and message in text
    cut = "cut short" in text or "cut-short" in text
    assert ("--force-download" in text) == cut and ("give a file that torch.save wrote" in text) != cut
    assert "Weights only" not in text and "weights_only" not in text


def test_a_flipped_byte_in_the_pickled_structure_is_named_as_damage(tmp_path):
    """torch reads a zip entry without checking its CRC: a bit flipped in transit makes the pickle fail,
    and only the checksum tells damage from a file holding what weights-only loading refuses."""
    path = tmp_path / "flipped.pth"
    torch.save({"model": {"w": torch.ones(4)}}, path)
    data = bytearray(path.read_bytes())
    data[data.index(b"_rebuild_tensor_v2") + 1] ^= 0x20  # _Rebuild_tensor_v2: no such function
    path.write_bytes(bytes(data))
    with pytest.raises(ConverterError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"{path}: cannot read checkpoint: it is a damaged zip archive: flipped/data.pkl fails its checksum; "
        "if it came from the download cache, fetch it again with --force-download"
    )


def test_a_plain_pickle_is_refused_without_torchs_protocol_warning(tmp_path):
    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps({"model": {"w": 1}}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConverterError, match="a plain pickle"):
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
