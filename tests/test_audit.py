"""The audit of published X-CLIP models (converter/audit.py, converter/published.py).

Offline: "published" folders are built from synthetic checkpoints with each known upstream mistake
(8 MIT/prompt heads on an L/14-shaped model, 0.5 mean/std, a 224 crop on a 336 model, a tokenizer
that pads on the left, one changed weight), placed as plain folders and in a temporary HF cache
(hub layout, HF_HUB_OFFLINE=1); the audit must name each mistake and fail, and pass a correct
folder. `test_published` (release) audits microsoft/<model-name> against the real checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from converter.audit import EXIT_MISMATCH, KINDS, audit, fix_card, original_preprocessing, propose_fix
from converter.build import build_model
from converter.config import Hyper, to_config
from converter.errors import ConverterError
from converter.processing import build_tokenizer
from converter.registry import VARIANTS
from converter.rules import original_to_hf
from converter.synthetic import make_state_dict
from converter.verify import Verification, verify
from tests import helpers
from tests.helpers import SQUARE, UNEVEN
from tests.release_clips import real_checkpoint, unavailable

REFERENCE = Path(__file__).parent / "data" / "preprocessing" / "reference.npz"

# L/14-shaped where it matters: E = 768, so the original has 768 // 64 = 12 MIT and prompt heads and
# 8 heads (head width 96) compute something else. Patch 14; the other widths small to stay fast.
L14 = Hyper(
    embed_dim=768, image_size=28, patch_size=14, frames=2,
    vision_width=64, vision_layers=1, vision_heads=1, vision_mlp=128,
    text_width=64, text_layers=1, text_heads=1, text_mlp=128,
    vocab_size=100, context_length=77,
    mit_layers=1, mit_heads=12, mit_mlp=256, prompt_layers=2, prompt_heads=12,
)  # fmt: skip
# A 336-px model (patch 28 keeps the token count small).
S336 = dataclasses.replace(SQUARE, image_size=336, patch_size=28)

# mistake -> (model, the failing checks, names the failing findings must include)
MISTAKES = {
    "correct": (SQUARE, set(), set()),
    "8-heads": (
        L14, {"config", "outputs"}, {"prompt_num_attention_heads", "vision_config.mit_num_attention_heads"}
    ),
    "0.5-stats": (SQUARE, {"preprocessing"}, {"mean", "std", "measured"}),
    "224-crop": (S336, {"preprocessing"}, {"crop", "output shape"}),
    "clip-processor": (SQUARE, {"preprocessing"}, {"processor_type"}),
    "left-padding": (SQUARE, {"tokenizer"}, {"playing sports", "eating spaghetti"}),
    "changed-weight": (SQUARE, {"weights", "outputs"}, {"text_projection.weight"}),
    "float16-config": (SQUARE, {"config"}, {"dtype"}),
    "loading-keys": (SQUARE, {"config"}, {"quantization_config", "auto_map"}),
}  # fmt: skip
MODELS = {"square": SQUARE, "l14": L14, "s336": S336}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[Hyper, tuple[Path, dict[str, torch.Tensor]]]:
    """One original checkpoint per model shape, saved as the trainer does ({'model': sd})."""
    root = tmp_path_factory.mktemp("originals")
    made = {}
    for name, hyper in MODELS.items():
        state_dict = make_state_dict(hyper, seed=len(made) + 1)
        torch.save({"model": state_dict}, root / f"{name}.pth")
        made[hyper] = (root / f"{name}.pth", state_dict)
    return made


def original_config(hyper: Hyper):
    """The original's config where the widths (below 64) cannot say the heads; None: infer them."""
    return None if hyper is L14 else to_config(hyper)


def publish(folder: Path, hyper: Hyper, original: dict[str, torch.Tensor], mistake: str) -> Path:
    """A folder laid out as the hub's X-CLIP repos are, carrying one known mistake."""
    folder.mkdir(parents=True)
    config = to_config(hyper)
    weights = original_to_hf(original)
    processor = {
        **original_preprocessing(hyper.image_size),
        "image_processor_type": "VideoMAEImageProcessor",
        "processor_class": "XCLIPProcessor",
    }
    if mistake == "8-heads":  # the old conversion script's heads for the L/14 models
        config.prompt_num_attention_heads = 8
        config.vision_config.mit_num_attention_heads = 8
    elif mistake == "0.5-stats":
        processor.update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif mistake == "clip-processor":  # AutoImageProcessor would build CLIP's, which takes frames as images
        processor.update(image_processor_type="CLIPImageProcessor")
    elif mistake == "224-crop":
        processor.update(crop_size={"height": 224, "width": 224})
    elif mistake == "float16-config":  # float32 weights that from_pretrained would load as float16
        config.dtype = torch.float16
    elif mistake == "loading-keys":  # from_pretrained would quantize, or AutoModel run the repo's code
        config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
        config.auto_map = {"AutoModel": "evil.Model"}
    elif mistake == "changed-weight":
        weights["text_projection.weight"] = weights["text_projection.weight"] + 1e-3
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    build_tokenizer().save_pretrained(folder)
    if mistake == "left-padding":
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "padding_side": "left"}))
    return folder


def place_in_hub_cache(folder: Path, repo_id: str, monkeypatch) -> Path:
    """Move `folder` into the (sandboxed) HF cache as snapshot_download leaves a repo; go offline."""
    from huggingface_hub import constants

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    folder.rename(repo / "snapshots" / commit)
    go_offline(monkeypatch)
    return repo / "snapshots" / commit


def go_offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in folder.iterdir()
    }


@pytest.mark.parametrize("where", ["folder", "hub"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_audit_names_each_mistake(mistake, where, originals, tmp_path, monkeypatch):
    hyper, failing_kinds, names = MISTAKES[mistake]
    path, original = originals[hyper]
    folder = publish(tmp_path / "published", hyper, original, mistake)
    source = str(folder)
    if where == "hub":
        source = f"someone/xclip-{mistake}"
        folder = place_in_hub_cache(folder, source, monkeypatch)
    before = fingerprint(folder)

    report = audit(source, checkpoint=path, config=original_config(hyper), reference=REFERENCE)

    failures = [f for f in report.findings if not f.ok]
    assert {f.kind for f in failures} == failing_kinds, "\n".join(report.lines())
    assert names <= {f.name for f in failures}, "\n".join(report.lines())
    assert report.passed is (mistake == "correct")
    if failing_kinds:
        assert report.exit_code == EXIT_MISMATCH
        worst = report.ordered()[0]
        assert not worst.ok and worst.kind == min(failing_kinds, key=KINDS.index)
        assert f"worst: {worst.kind}: {worst.describe()}" in report.lines()[0]  # named first
    # Never writes into the source.
    assert fingerprint(folder) == before
    data = json.loads(report.to_json())
    assert data["passed"] is report.passed and len(data["findings"]) == len(report.findings)


def test_each_output_over_its_tolerance_fails_on_its_own_line(originals, tmp_path):
    """Besides the first divergence, each output beyond its tolerance is a failing finding of its own,
    and one within it passes: a reader sees which outputs a mistake reaches."""
    path, original = originals[SQUARE]
    folder = publish(tmp_path / "published", SQUARE, original, "changed-weight")
    report = audit(str(folder), checkpoint=path, config=original_config(SQUARE), reference=REFERENCE)
    outputs = [f for f in report.findings if f.kind == "outputs" and f.name != "first divergence"]
    assert any(not f.ok for f in outputs) and any(f.ok for f in outputs), "\n".join(report.lines())
    for f in outputs:
        assert f.ok is (f.severity <= 1), f.describe()


def test_a_config_stating_the_published_heads_does_not_hide_them(tmp_path):
    """--config with the published model's own 8 heads, where E = 768 leaves the original 12: the oracle
    would compute the same mistake, so the config's heads are held to width // 64 (all widths above 64,
    as in every published model)."""
    wide = dataclasses.replace(
        L14, vision_width=128, vision_heads=2, vision_mlp=256, text_width=128, text_heads=2, text_mlp=256
    )
    original = make_state_dict(wide, seed=9)
    torch.save({"model": original}, tmp_path / "wide.pth")
    folder = publish(tmp_path / "published", wide, original, "8-heads")
    report = audit(
        str(folder), checkpoint=tmp_path / "wide.pth", config=folder / "config.json", reference=REFERENCE
    )
    failures = {f.name: f for f in report.findings if not f.ok}
    assert not report.passed and report.exit_code == EXIT_MISMATCH, "\n".join(report.lines())
    assert {"prompt_num_attention_heads", "vision_config.mit_num_attention_heads"} <= set(failures)
    assert "the original computes width // 64 = 12" in failures["prompt_num_attention_heads"].detail


def test_more_heads_than_the_original_computes_are_named_like_fewer():
    """heads_off_rule, behind the audit's finding and the way back's hint: a stated head count above
    width // 64 is as wrong as one below it."""
    from converter.config import heads_off_rule, hyper_for_variant

    b32 = hyper_for_variant(VARIANTS["xclip-base-patch32"])  # vision width 768, E 512
    assert heads_off_rule(b32) == []
    stated = dataclasses.replace(b32, vision_heads=16, prompt_heads=4)
    assert heads_off_rule(stated) == [
        ("vision_config.num_attention_heads", 16, 12),
        ("prompt_num_attention_heads", 4, 8),
    ]


def test_a_small_model_whose_config_states_its_heads_audits_as_it_converts(tmp_path):
    """UNEVEN (vision width 96 with 3 heads, E = 48) converts and verifies with its config's heads; its
    audit against the same config agrees."""
    original = make_state_dict(UNEVEN, seed=3)
    torch.save({"model": original}, tmp_path / "uneven.pth")
    folder = publish(tmp_path / "published", UNEVEN, original, "correct")
    report = audit(
        str(folder), checkpoint=tmp_path / "uneven.pth", config=to_config(UNEVEN), reference=REFERENCE
    )
    assert report.passed, "\n".join(report.lines())


def test_eight_heads_output(originals, tmp_path, capsys):
    """The L/14 case as a user sees it (the report's text, printed for the README and closing note)."""
    path, original = originals[L14]
    folder = publish(tmp_path / "xclip-large-patch14", L14, original, "8-heads")
    report = audit(str(folder), checkpoint=path, reference=REFERENCE)
    lines = report.lines()
    assert "prompt_num_attention_heads 8 ≠ 12 (changes the computation)" in lines[0]
    assert lines[1].split() == ["FAIL", "config", "prompt_num_attention_heads", "8", "≠", "12", "(changes",
                                "the", "computation)"]  # fmt: skip
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_padding_id_alone_is_a_note(originals, tmp_path):
    """A pad id other than CLIP's changes no output: reported, not failed. (Not "!", the original's
    pad id 0: as a special token it would also split "!!" in the text, which the audit reports.)"""
    path, original = originals[SQUARE]
    folder = publish(tmp_path / "pub", SQUARE, original, "correct")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "<|startoftext|>"}))
    report = audit(str(folder), checkpoint=path, config=to_config(SQUARE))
    notes = [f for f in report.findings if f.kind == "tokenizer" and f.changes_computation is False]
    assert notes and all(f.ok for f in notes) and "padding only" in notes[0].detail
    assert report.passed, "\n".join(report.lines())


def test_a_config_is_written_to_load_as_verified(tmp_path, caplog):
    """A --config's keys that make from_pretrained load something other than the verified weights are
    left out of config.json, with a warning naming them; config.json always names XCLIPModel."""
    from transformers import XCLIPModel

    from converter.config import LOADING_KEYS
    from converter.pipeline import convert_checkpoint

    path, config = helpers.checkpoint("tiny-a"), helpers.write_config("tiny-a", tmp_path / "cfg")
    given = json.loads(config.read_text())
    given.update(architectures=5, auto_map={"AutoModel": "evil.Model"}, transformers_weights="x.safetensors")
    given.update(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    (tmp_path / "given.json").write_text(json.dumps(given))

    convert_checkpoint(path, config=tmp_path / "given.json", output=tmp_path / "out")

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["XCLIPModel"] and not set(LOADING_KEYS) & written.keys()
    assert "leaves out quantization_config, auto_map, transformers_weights, which make" in caplog.text
    XCLIPModel.from_pretrained(tmp_path / "out")  # bitsandbytes would be asked for, were it kept


def test_fused_modules_are_a_loading_key_too():
    """fusion_config has from_pretrained fuse modules, computing other than the verified weights: it is
    left out of config.json (and named by the audit) like the three keys the conversion above gives."""
    from converter.config import loading_keys

    config = to_config(UNEVEN)
    assert loading_keys(config) == []
    config.fusion_config = {"fuse": True}
    assert loading_keys(config) == ["fusion_config"]


def test_a_config_object_given_to_the_library_is_left_as_it_was(tmp_path):
    """What is written is decided on a copy: the caller's XCLIPConfig keeps its keys and dtype."""
    from transformers import XCLIPConfig

    from converter.pipeline import convert_checkpoint

    path, file = helpers.checkpoint("tiny-a"), helpers.write_config("tiny-a", tmp_path / "cfg")
    config = XCLIPConfig.from_json_file(file)
    config.auto_map = {"AutoModel": "evil.Model"}
    before = config.to_dict()
    convert_checkpoint(path, config=config, dtype="float16", output=tmp_path / "out")
    assert config.to_dict() == before
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize(
    "switches", [{"return_dict": False}, {"output_attentions": True}, {"attn_implementation": "nonsense"}]
)
def test_a_configs_switches_change_no_check(switches, tmp_path):
    """A --config's output switches and attention choice are the user's to keep, and neither the
    verification nor an audit of the written folder reads its outputs through them."""
    from transformers import XCLIPModel

    from converter.pipeline import convert_checkpoint

    path, config = helpers.checkpoint("tiny-a"), helpers.write_config("tiny-a", tmp_path / "cfg")
    given = {**json.loads(config.read_text()), **switches}
    (tmp_path / "given.json").write_text(json.dumps(given))

    convert_checkpoint(path, config=tmp_path / "given.json", output=tmp_path / "out")

    loaded = XCLIPModel.from_pretrained(tmp_path / "out").config
    assert loaded.return_dict is switches.get("return_dict", True)
    assert loaded.output_attentions is switches.get("output_attentions", False)
    report = audit(str(tmp_path / "out"), checkpoint=path, config=config, reference=REFERENCE)
    assert report.passed, "\n".join(report.lines())


# ---- bad input: ConverterError (exit 2) ----------------------------------------------------------


def test_bad_input(originals, tmp_path, monkeypatch):
    path, original = originals[SQUARE]
    with pytest.raises(ConverterError, match="no such folder, and not a hub repo id"):
        audit(str(tmp_path / "absent"), checkpoint=path)
    with pytest.raises(ConverterError, match="needs --model-name or --checkpoint"):
        audit(str(tmp_path))
    folder = publish(tmp_path / "pub", SQUARE, original, "correct")
    with pytest.raises(ConverterError, match="does not look like xclip-base-patch32"):
        audit(str(folder), checkpoint=path, model_name="xclip-base-patch32", config=to_config(SQUARE))
    # Pickled weights are never unpickled.
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ConverterError, match=r"only pytorch_model.bin, a pickle"):
        audit(str(folder), checkpoint=path, config=to_config(SQUARE))
    go_offline(monkeypatch)
    with pytest.raises(ConverterError, match=r"someone/absent: not in the local HF cache .*HF_HUB_OFFLINE=1"):
        audit("someone/absent", checkpoint=path)
    with pytest.raises(ConverterError, match=r"HF_HUB_OFFLINE=1\), and no local folder of that name exists"):
        audit("converted/xclip-model", checkpoint=path)  # a local folder mistyped reads as a repo id
    place_in_hub_cache(
        publish(tmp_path / "cached", SQUARE, original, "correct"), "someone/cached", monkeypatch
    )
    with pytest.raises(ConverterError, match=r"someone/cached: revision v2 not in the local HF cache"):
        audit("someone/cached", checkpoint=path, revision="v2")  # the repo is cached, that revision not


# ---- the fix, as a pull request (HfApi mocked at the boundary) ---------------------------------


class FakeHfApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
        return type("CommitInfo", (), {"pr_url": f"https://huggingface.co/{repo_id}/discussions/7"})()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_propose_fix_opens_a_pr_with_the_findings(originals, tmp_path, hub):
    path, original = originals[L14]
    broken = publish(tmp_path / "published", L14, original, "8-heads")
    report = audit(str(broken), checkpoint=path)
    ours = publish(tmp_path / "ours", L14, original, "correct")
    (ours / "README.md").write_text("---\nlicense: mit\n---\n\n# xclip-large-patch14\n\nconverted\n")
    verification = verify(build_model(to_config(L14), original_to_hf(original)), original, L14)
    assert verification.passed

    url = propose_fix(report, ours, verification, "microsoft/xclip-large-patch14")

    assert url == "https://huggingface.co/microsoft/xclip-large-patch14/discussions/7"
    (name, upload), = [c for c in hub.calls if c[0] == "upload_folder"]  # fmt: skip
    assert upload["create_pr"] is True and upload["repo_id"] == "microsoft/xclip-large-patch14"
    card = upload["files"]["README.md"].decode()
    assert card.startswith("---\nlicense: mit\n---\n") and "## What this pull request fixes" in card
    assert "prompt_num_attention_heads 8 ≠ 12" in card and "# xclip-large-patch14" in card
    assert upload["files"]["model.safetensors"] == (ours / "model.safetensors").read_bytes()
    assert (ours / "README.md").read_text().endswith("converted\n")  # the folder itself is not changed


def test_propose_fix_refused_unless_verified(originals, tmp_path, hub):
    path, original = originals[SQUARE]
    folder = publish(tmp_path / "pub", SQUARE, original, "0.5-stats")
    report = audit(str(folder), checkpoint=path, config=to_config(SQUARE))
    failed = Verification({"logits": 1.0}, {"logits": 1e-4}, 1e-4)
    passed = Verification({"logits": 0.0}, {"logits": 1e-4}, 1e-4)
    for verification in (None, failed):
        with pytest.raises(ConverterError, match="not verified"):
            propose_fix(report, folder, verification, "someone/repo")
    report.findings = [f for f in report.findings if f.ok]
    with pytest.raises(ConverterError, match="nothing to fix"):
        propose_fix(report, folder, passed, "someone/repo")
    assert hub.calls == []


def test_a_matching_repo_gets_no_pull_request_and_no_conversion(
    originals, tmp_path, hub, monkeypatch, capsys
):
    """Said after the audit, before the minutes a conversion for the pull request would take."""
    from converter import pipeline
    from converter.cli import main

    path, original = originals[SQUARE]
    config = tmp_path / "config.json"
    original_config(SQUARE).to_json_file(config)
    place_in_hub_cache(
        publish(tmp_path / "pub", SQUARE, original, "correct"), "someone/xclip-ok", monkeypatch
    )
    monkeypatch.setattr(FakeHfApi, "whoami", lambda self: {"name": "someone"}, raising=False)
    monkeypatch.setattr(pipeline, "convert_checkpoint", lambda *a, **k: pytest.fail("converted for nothing"))
    args = ["--audit", "someone/xclip-ok", "--checkpoint", path, "--config", config, "--push-to-hub"]
    assert main([*map(str, args), "--create-pr", "-q"]) == 0
    assert "no pull request opened: someone/xclip-ok matches the original" in capsys.readouterr().out
    assert hub.calls == []


def test_a_sharded_snapshot_whose_blobs_live_on_another_disk_is_read(originals, tmp_path, monkeypatch):
    """The HF cache links a snapshot's files into blobs/, which may link to another disk: that is the
    cache's layout, not a shard outside the repo. A shard linked anywhere else still is."""
    from safetensors import safe_open

    path, original = originals[SQUARE]
    folder = publish(tmp_path / "pub", SQUARE, original, "correct")
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        index = {"weight_map": dict.fromkeys(weights.keys(), "shard.safetensors")}
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    snapshot = place_in_hub_cache(folder, "someone/xclip-blobs", monkeypatch)
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    for file in snapshot.iterdir():
        file.rename(other_disk / file.name)
        file.symlink_to(f"../../blobs/{file.name}")
    (snapshot.parents[1] / "blobs").symlink_to(other_disk)
    assert audit("someone/xclip-blobs", checkpoint=path, config=to_config(SQUARE)).passed

    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes((other_disk / "shard.safetensors").read_bytes())
    (snapshot / "shard.safetensors").unlink()
    (snapshot / "shard.safetensors").symlink_to(elsewhere)
    with pytest.raises(ConverterError, match="shard 'shard.safetensors' lies outside someone/xclip-blobs"):
        audit("someone/xclip-blobs", checkpoint=path, config=to_config(SQUARE))


def test_fix_card_without_front_matter():
    from converter.audit import AuditReport, Finding

    report = AuditReport("a/b", "orig.pth", 1e-4, [Finding("config", "x", 1, 2, False, True)])
    assert fix_card(report, "# card\n").startswith("## What this pull request fixes")
    assert "| config | x 1 ≠ 2 (changes the computation) |" in fix_card(report, "")


def test_the_report_shows_the_worst_first_and_shortens_only_its_lines():
    """Failures first, by check and then by severity; a passing finding is never said to change the
    computation; past LINES_PER_KIND a kind's lines are counted, and the JSON keeps every finding, with
    an infinite severity (a missing tensor's) as null, which strict JSON readers accept."""
    from converter.audit import LINES_PER_KIND, AuditReport, Finding

    missing = Finding("weights", "absent.weight", "absent", [2], False, True, severity=float("inf"))
    close = [Finding("weights", f"w{i}", None, None, False, True, f"w{i}: max |Δ| {i}", i) for i in range(15)]
    passing = Finding("outputs", "every site", 3, 3, True, True, "all 3 sites within tolerance")
    tokens = Finding("tokenizer", "x", None, None, False, True, "x: ids differ", 1.0)
    report = AuditReport("a/b", "orig.pth", 1e-4, [passing, tokens, *close, missing], revision="c" * 40)

    assert report.ordered()[:3] == [missing, close[14], close[13]]
    assert report.ordered()[-2:] == [tokens, passing]
    assert report.summary().startswith(f"audit a/b@{'c' * 10} vs orig.pth: MISMATCH, 17 findings")
    assert passing.describe() == "all 3 sites within tolerance"
    lines = report.lines()
    weights = [line for line in lines if line.split()[:2] == ["FAIL", "weights"]]
    assert len(weights) == LINES_PER_KIND and "absent.weight" in weights[0]
    assert lines[-1] == f"  …  weights       {16 - LINES_PER_KIND} more (all in the JSON report)"
    assert "  ok   outputs       all 3 sites within tolerance" in lines
    data = json.loads(report.to_json(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert len(data["findings"]) == 18 and data["findings"][0]["severity"] is None


@pytest.mark.parametrize(
    "kind", ["VideoMAEImageProcessor", "VideoMAEImageProcessorPil", "VideoMAEImageProcessorFast"]
)
def test_each_variant_of_videomaes_processor_class_is_accepted(kind):
    """Each transformers version saves its own variant of the class name: none is a finding."""
    from converter.audit import preprocessing_findings

    raw = {**original_preprocessing(224), "image_processor_type": kind}
    findings = preprocessing_findings(raw, 224, REFERENCE)
    assert [f.name for f in findings] == ["measured"] and findings[0].ok


def test_weights_published_in_float16_are_compared_in_float16():
    """A float16 publication of the original holds our conversion rounded to float16: identical, not a
    finding per tensor; a weight off by more than that rounding still is one."""
    from converter.audit import weight_findings
    from converter.published import Published

    ours = original_to_hf(make_state_dict(SQUARE, seed=4))
    half = {k: v.half() for k, v in ours.items()}
    published = Published("a/b", Path("."), None, half, None)
    findings = weight_findings(published, ours)
    assert [(f.name, f.ok) for f in findings] == [("identical", True)], findings[0].detail
    half["text_projection.weight"] = half["text_projection.weight"] + 0.5
    failing = [f.name for f in weight_findings(published, ours) if not f.ok]
    assert failing == ["text_projection.weight", "identical"]


def test_outputs_of_a_float16_publication_are_held_to_the_original_rounded_alike(originals, tmp_path):
    """The oracle runs on the original rounded to the published dtype: a correct float16 publication
    passes every output check, where the float32 original's outputs differ by the rounding alone."""
    from safetensors.torch import load_file

    from converter import DEFAULT_ATOL
    from converter.audit import output_findings
    from converter.published import load_published

    path, original = originals[SQUARE]
    folder = publish(tmp_path / "pub", SQUARE, original, "correct")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, folder / "model.safetensors")
    findings = output_findings(load_published(folder), original, SQUARE, DEFAULT_ATOL, True)
    assert findings and all(f.ok for f in findings), [f.describe() for f in findings if not f.ok]


def test_a_tokenizer_differing_at_the_end_token_fails():
    """The text tower pools at the end token: a tokenizer that ends with another id differs in what the
    model computes, not in the padding after it."""
    from converter.audit import SENTENCES, tokenizer_findings

    reference = build_tokenizer()

    class OtherEnd:  # the published tokenizer, as load_tokenizer returns it: the end token replaced
        def load_tokenizer(self):
            def tokenize(sentence, **kwargs):
                ids = reference(sentence, **kwargs)["input_ids"]
                return {"input_ids": [0 if i == reference.eos_token_id else i for i in ids]}

            return tokenize

    findings = tokenizer_findings(OtherEnd())
    failing = [f for f in findings if not f.ok and f.name != "identical"]
    assert len(failing) == len(SENTENCES) and all(f.changes_computation for f in failing)
    assert findings[-1].name == "identical" and not findings[-1].ok  # the summary line fails too
    assert all("(at the end token)" in f.detail for f in failing), failing[0].detail


def test_a_reference_covering_only_some_frames_at_this_size_is_not_used(tmp_path):
    """A reference .npz holds the original's output per frame and size: one lacking a frame at the model's
    size is passed over for generated frames, not read for a key it does not have."""
    import numpy as np

    from converter.audit import preprocessing_findings

    frame = np.zeros((24, 32, 3), dtype=np.uint8)
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{"frame/a": frame, "frame/b": frame, "original224/a": np.zeros((224, 224, 3))})
    raw = {**original_preprocessing(224), "image_processor_type": "VideoMAEImageProcessor"}
    measured = preprocessing_findings(raw, 224, partial)[-1]
    assert measured.ok and "3 generated frames" in measured.detail


def test_a_config_with_a_narrow_embedding_states_its_heads():
    """Towers 128 wide but an embedding of 48 (a small test model): the original's width // 64 gives no
    MIT or prompt heads at 48, so the config's heads are the original's and no finding is made of them."""
    from converter.audit import config_findings
    from converter.published import Published

    narrow = dataclasses.replace(
        UNEVEN, vision_width=128, vision_heads=2, vision_mlp=256, text_width=128, text_heads=2, text_mlp=256
    )
    config = to_config(narrow)
    published = Published("a/b", Path("."), config, {"w": torch.zeros(2)}, None)
    findings = config_findings(published, to_config(narrow), narrow)
    assert [(f.name, f.ok) for f in findings] == [("all", True)], [f.describe() for f in findings]


def test_a_snapshot_cached_in_part_is_not_audited_offline(originals, tmp_path, monkeypatch):
    """from_pretrained caches config and weights only: the repo's tokenizer and processor are not missing."""
    path, original = originals[SQUARE]
    folder = publish(tmp_path / "published", SQUARE, original, "correct")
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        (folder / name).unlink()
    place_in_hub_cache(folder, "someone/xclip-part", monkeypatch)
    with pytest.raises(ConverterError, match="cached snapshot has no tokenizer or processor files"):
        audit("someone/xclip-part", checkpoint=path, config=original_config(SQUARE))


def test_a_pull_requests_card_shows_no_local_path_or_credentials(originals, tmp_path, fast_network):
    """The audited folder's path and a checkpoint URL's password stay on the user's machine."""
    from tests._http import LoopbackServer

    path, original = originals[SQUARE]
    folder = publish(tmp_path / "clients-acme-model", SQUARE, original, "changed-weight")
    with LoopbackServer({"/sq.pth": path.read_bytes()}) as server:
        url = server.url("/sq.pth").replace("http://", "http://user:secret@") + "?token=secret"
        report = audit(str(folder), checkpoint=url, config=original_config(SQUARE))
    card = fix_card(report, "", "someone/xclip")
    assert "secret" not in card and str(tmp_path) not in card and "acme" not in card
    assert "`xclip-convert --audit someone/xclip`) compared a local copy of this repository" in card


# ---- release: the published models on the hub ----------------------------------------------------


@pytest.mark.release
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(n), id=n) for n in VARIANTS])
def test_published(name, request, record_property):
    """microsoft/<model-name> on the hub against the real original checkpoint."""
    from converter.published import load_published

    try:
        published = load_published(f"microsoft/{name}")  # offline and not cached: skip before the checkpoint
    except ConverterError as err:
        if "not in the local HF cache" not in str(err):
            raise
        unavailable(request.config, str(err))
    checkpoint = real_checkpoint(request.config, VARIANTS[name])
    report = audit(published, model_name=name, checkpoint=checkpoint, reference=REFERENCE)
    record_property("audit", report.summary())
    if not report.passed:
        # The hub's repos came from the old script (0.5 stats everywhere, 8 heads on L/14): a known
        # mismatch there is reported, with its findings, and does not block releasing our conversions.
        pytest.xfail("\n".join(report.lines()))
