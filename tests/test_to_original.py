"""The way back (converter/to_original.py): a transformers X-CLIP folder to the original layout.

Round trip original -> HF -> original is bitwise identical (goldens, and a full-size synthetic
base-patch32 marked slow); the written file is verified the other way round; the output is written
only whole and only where allowed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from converter.config import hyper_for_variant, to_config
from converter.errors import ConverterError, VerificationError
from converter.load import load_checkpoint
from converter.registry import VARIANTS
from converter.rules import original_shapes, original_to_hf
from converter.synthetic import make_state_dict
from converter.to_original import _compact, to_original
from tests import helpers
from tests.test_audit import L14, publish


def hf_folder(folder, original, config=None, case=None):
    """A converted folder (config.json + model.safetensors), as the forward direction writes it."""
    folder.mkdir()
    if case is not None:
        helpers.write_config(case, folder)
    else:
        config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in original_to_hf(original).items()}, folder / "model.safetensors")
    return folder


def assert_bitwise(written, original):
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


@pytest.mark.parametrize("case", ["tiny-a", "tiny-a-fp16", "tiny-b"])
def test_round_trip_goldens(case, tmp_path):
    original = load_checkpoint(helpers.checkpoint(case))
    folder = hf_folder(tmp_path / "hf", original, case=case)
    result = to_original(folder, tmp_path / "back.pth")

    assert result.verification.passed and result.tensors == len(original)
    raw = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(raw) == ["model"]  # the trainer's layout, nothing else
    assert_bitwise(raw["model"], original)
    assert list(raw["model"]) == list(original)  # the original checkpoint's key order, not sorted
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*partial*"))


def test_names_of_torch_checkpoints_are_written_and_other_formats_refused(tmp_path):
    """PyTorch's own `.pth.tar`, a version in the name, no suffix: written; a safetensors name refused."""
    folder = hf_folder(tmp_path / "hf", load_checkpoint(helpers.checkpoint("tiny-a")), case="tiny-a")
    for name in ("back.pth.tar", "xclip_v1.5", "back", "BACK.PTH"):
        assert to_original(folder, tmp_path / name).verification.passed, name
    with pytest.raises(ConverterError, match="not a .safetensors file: name it FILE.pth"):
        to_original(folder, tmp_path / "back.SafeTensors")


@pytest.mark.slow
def test_round_trip_full_size(tmp_path):
    hyper = hyper_for_variant(VARIANTS["xclip-base-patch32"])
    original = make_state_dict(hyper, seed=3)
    folder = hf_folder(tmp_path / "hf", original, config=to_config(hyper))
    result = to_original(folder, tmp_path / "k400_32_8.pth")
    assert result.verification.passed, result.verification.summary()
    written = load_checkpoint(tmp_path / "k400_32_8.pth")
    assert_bitwise(written, original)
    assert list(written) == list(original_shapes(hyper))


def test_written_tensors_own_their_bytes():
    """torch.save writes whole storages: a view (a slice, a transpose of a shared tensor) must not
    carry its base into the file."""
    base = torch.arange(12.0).view(4, 3)
    for view in (base[:1], base.t()):
        compact = _compact(view)
        assert torch.equal(compact, view) and compact.is_contiguous()
        assert compact.untyped_storage().nbytes() == view.numel() * view.element_size()


def test_wrong_heads_are_not_written(tmp_path):
    """An HF model with the old port's 8 heads computes something the original never did: the oracle
    on the written keys (12 heads, width // 64) disagrees, and nothing is left behind."""
    original = make_state_dict(L14, seed=5)
    folder = publish(tmp_path / "published", L14, original, "8-heads")
    with pytest.raises(VerificationError, match=r"prompt_num_attention_heads 8 ≠ 12.*nothing was written"):
        to_original(folder, tmp_path / "out" / "model.pth")
    assert not (tmp_path / "out").exists()  # nor the folder made for it
    # The same weights with the right config go back fine.
    correct = publish(tmp_path / "correct", L14, original, "correct")
    assert to_original(correct, tmp_path / "out" / "model.pth").verification.passed


def test_a_token_row_no_input_looks_up_is_verified_too(tmp_path, monkeypatch):
    """The oracle's inputs look up a few dozen ids: a way back that changed another row of the token table
    would pass every site, so each row is compared, and nothing is written."""
    from transformers import XCLIPConfig

    from converter import rules
    from converter.config import hyper_from_config
    from converter.verify import synthetic_inputs

    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    folder = hf_folder(tmp_path / "hf", original, case="tiny-a")
    hyper = hyper_from_config(XCLIPConfig.from_json_file(folder / "config.json"))
    unused = min(set(range(hyper.vocab_size)) - set(synthetic_inputs(hyper)[1].flatten().tolist()))
    mapped = rules.hf_to_original

    def one_row_off(weights):
        back = mapped(weights)
        table = back["token_embedding.weight"].clone()
        table[unused] += 1.0
        return {**back, "token_embedding.weight": table}

    monkeypatch.setattr(rules, "hf_to_original", one_row_off)
    with pytest.raises(VerificationError, match="token embeddings differ from the original's in 1 of"):
        to_original(folder, tmp_path / "back.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_output_safety(tmp_path):
    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    folder = hf_folder(tmp_path / "hf", original, case="tiny-a")
    existing = tmp_path / "mine.pth"
    existing.write_bytes(b"a user's file")
    with pytest.raises(ConverterError, match="exists; pass --overwrite"):
        to_original(folder, existing)
    assert existing.read_bytes() == b"a user's file"
    with pytest.raises(ConverterError, match="is the source"):
        to_original(folder, folder)
    with pytest.raises(ConverterError, match="inside the source"):
        to_original(folder, folder / "model.pth")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    to_original(folder, existing, overwrite=True)
    assert_bitwise(load_checkpoint(existing), original)


def test_nothing_half_written(tmp_path, monkeypatch):
    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    folder = hf_folder(tmp_path / "hf", original, case="tiny-a")
    out = tmp_path / "out"
    out.mkdir()

    def disk_full(obj, file):
        file.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ConverterError, match=r"could not write .*model.pth.*No space left"):
        to_original(folder, out / "model.pth")
    assert list(out.iterdir()) == []


def test_ctrl_c_while_torch_save_writes_is_the_interruption(tmp_path, monkeypatch, capsys):
    """A signal handled inside torch.save's writes leaves its zip writer unable to close the archive,
    which raises a RuntimeError of its own: the run still ends as interrupted (130), with nothing left."""
    import io
    import signal

    from converter import cli, export

    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    folder = hf_folder(tmp_path / "hf", original, case="tiny-a")
    out = tmp_path / "out"
    out.mkdir()

    class InterruptedWhileWriting(io.FileIO):  # as the handler raises it within the third write
        writes = 0

        def write(self, data):
            InterruptedWhileWriting.writes += 1
            if InterruptedWhileWriting.writes == 3:
                raise export.Interrupted(signal.SIGINT)
            return super().write(data)

    monkeypatch.setattr(export, "open", InterruptedWhileWriting, raising=False)
    assert cli.main(["--to-original", str(folder), "--output", str(out / "back.pth")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"xclip-convert: interrupted by SIGINT; --output {out / 'back.pth'} was not changed"
    )
    assert list(out.iterdir()) == []


def test_a_real_full_disk_is_named_and_leaves_nothing(tmp_path, small_disk):
    """torch.save's own failure on a full disk (not a mocked OSError) is one line naming the file."""
    from converter.config import to_config
    from converter.synthetic import make_state_dict

    original = make_state_dict(helpers.UNEVEN, seed=1)  # 5 MB, on a 2 MB disk
    folder = hf_folder(tmp_path / "hf", original, config=to_config(helpers.UNEVEN))
    out = small_disk / "back.pth"
    with pytest.raises(ConverterError, match=rf"could not write {out}: No space left on device; --output"):
        to_original(folder, out)
    assert list(small_disk.iterdir()) == []


def test_bad_source(tmp_path, monkeypatch):
    with pytest.raises(ConverterError, match="no such folder, and not a hub repo id"):
        to_original(tmp_path / "absent", tmp_path / "x.pth")
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ConverterError, match="no config.json"):
        to_original(folder, tmp_path / "x.pth")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConverterError, match="not in the local HF cache"):
        to_original("microsoft/xclip-base-patch32", tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("atol", [float("inf"), float("nan"), 0, -1, "1e-3"])
def test_a_bad_atol_is_refused_before_any_work(tmp_path, atol):
    """As convert_checkpoint refuses it: not a verification that blames the model, nor a TypeError."""
    with pytest.raises(ConverterError, match="--atol must be a finite number above 0"):
        to_original(tmp_path / "absent", tmp_path / "x.pth", atol=atol)
    assert sorted(tmp_path.iterdir()) == []


def test_damaged_weights_are_named_in_the_source_before_anything_is_written(tmp_path):
    """inf in a sharded folder's weights: its index and the published key, no advice for another job."""
    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    damaged = {**original, "ln_final.bias": original["ln_final.bias"] / 0}
    folder = hf_folder(tmp_path / "hf", damaged, case="tiny-a")
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    index = {"weight_map": dict.fromkeys(original_to_hf(original), "shard.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConverterError) as refused:
        to_original(folder, tmp_path / "back.pth")
    assert str(refused.value) == (
        f"{folder}: model.safetensors.index.json: non-finite values (NaN or inf) in 1 tensors: "
        "text_model.final_layer_norm.bias (32 of 32). The weights are damaged; convert or download the model "
        "again"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_killed_runs_partial_file_is_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".back.pth.partial-{int(gone.stdout)}-0123abcd"
    leftover.write_bytes(b"half a checkpoint")  # what SIGKILL leaves (no handler runs)
    folder = hf_folder(tmp_path / "hf", load_checkpoint(helpers.checkpoint("tiny-a")), case="tiny-a")
    to_original(folder, tmp_path / "back.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.pth", "hf"]


def test_stages_are_logged_as_the_forward_direction_logs_them(tmp_path, caplog):
    original = load_checkpoint(helpers.checkpoint("tiny-a"))
    folder = hf_folder(tmp_path / "hf", original, case="tiny-a")
    with caplog.at_level("INFO", logger="converter"):
        to_original(folder, tmp_path / "back.pth")
    lines = [r.getMessage() for r in caplog.records if r.name == "converter"]
    assert [line.split(":", 1)[0] for line in lines] == ["load", "map", "write", "verify"]
    assert lines[0].startswith(f"load: {folder}, 151 tensors (") and lines[1].startswith("map: 123 tensors")
    assert lines[2].startswith(f"write: {tmp_path / 'back.pth'} (") and "verification OK" in lines[3]
