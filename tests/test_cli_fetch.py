"""The CLI end to end over HTTP and at the hub boundary: fetch, convert, classify, publish."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from converter import fetch
from converter.errors import ConverterError
from converter.fetch import sha256_file
from converter.synthetic import make_state_dict
from tests import helpers
from tests._http import Fault, LoopbackServer
from tests.helpers import SQUARE, original_forward, run


@pytest.fixture(scope="module")
def golden_config(tmp_path_factory):
    return helpers.write_config("tiny-a", tmp_path_factory.mktemp("config"))


def test_converts_through_dropped_connections(fast_network, golden_config, tmp_path, monkeypatch, capsys):
    data = helpers.checkpoint("tiny-a-training-layout").read_bytes()
    out = tmp_path / "out"
    with LoopbackServer({"/x.pth": data}) as server:
        server.add_faults("/x.pth", Fault(truncate=0.3), Fault(status=503), Fault(truncate=0.5))
        url = server.url("/x.pth")
        assert run("--checkpoint", url, "--config", golden_config, "--output", out, "--sha256", sha256_file(
            helpers.checkpoint("tiny-a-training-layout"))) == 0  # fmt: skip
        assert any(hit.range for hit in server.hits_for("/x.pth"))  # it resumed
    assert "verification OK" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "XCLIPModel" and type(processor).__name__ == "XCLIPProcessor"
    card = (out / "README.md").read_text()
    assert url in card and sha256_file(helpers.checkpoint("tiny-a-training-layout")) in card


def test_corrupt_cached_file_says_how_to_refetch(fast_network, golden_config, tmp_path, capsys):
    data = helpers.checkpoint("tiny-a").read_bytes()
    with LoopbackServer({"/c.pth": data}) as server:
        url = server.url("/c.pth")
        cached = fetch.fetch_url(url)
        cached.write_bytes(data[: len(data) // 3])  # the cache got truncated behind our back
        assert run("--checkpoint", url, "--config", golden_config) == 2
        assert "--force-download" in capsys.readouterr().err
        assert run("--checkpoint", url, "--config", golden_config, "--force-download") == 0
        assert server.full_gets("/c.pth") == 2


def test_a_cached_file_changed_since_its_fetch_is_not_published(
    fast_network, fake_hub, golden_config, tmp_path, capsys
):
    """The card would vouch for the fetched file's digest: publishing hashes the file it converted."""
    import hashlib

    data = helpers.checkpoint("tiny-a").read_bytes()
    with LoopbackServer({"/c.pth": data}) as server:
        url = server.url("/c.pth")
        cached = fetch.fetch_url(url)
        cached.write_bytes(helpers.checkpoint("tiny-a-training-layout").read_bytes())  # converts too
        assert run("--checkpoint", url, "--config", golden_config, "--push-to-hub", "org/x") == 2
    err = capsys.readouterr().err
    assert f"not the {hashlib.sha256(data).hexdigest()} it was fetched" in err and "--force-download" in err
    assert [call[0] for call in fake_hub] == []


def test_404_is_one_clear_line(fast_network, tmp_path, capsys):
    with LoopbackServer({}) as server:
        assert run("--checkpoint", server.url("/missing.pth"), "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "404" in err and "/missing.pth" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_model_name_fetches_from_the_release_mirror(fast_network, monkeypatch, capsys):
    """--model-name goes to XCLIP_RELEASE_URL/<release file>; a file for the wrong model is caught."""
    data = helpers.checkpoint("tiny-a").read_bytes()
    with LoopbackServer({"/mirror/k400_32_8.pth": data}) as server:
        monkeypatch.setenv("XCLIP_RELEASE_URL", server.url("/mirror"))
        assert run("--model-name", "xclip-base-patch32") == 2
        assert server.full_gets("/mirror/k400_32_8.pth") == 1
    assert "does not look like xclip-base-patch32" in capsys.readouterr().err


def test_video_and_texts_print_probabilities(tmp_path, capsys):
    """The printed numbers are the original model's probabilities for the clip, text by text."""
    from converter.processing import encode_texts, load_video, preprocess_video

    hyper = dataclasses.replace(SQUARE, vocab_size=49408)  # CLIP's vocabulary, so real texts tokenize
    checkpoint = tmp_path / "ckpt.pth"
    state_dict = make_state_dict(hyper, seed=5)
    torch.save(state_dict, checkpoint)
    clip = tmp_path / "clip.npy"
    np.save(clip, np.random.default_rng(1).integers(0, 256, (8, 36, 40, 3), dtype=np.uint8))
    texts = ["playing sports", "eating spaghetti", "go shopping"]
    assert run("--checkpoint", checkpoint, "--video", clip, "--texts", *texts) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        prob, _, text = line.partition("  ")
        if text in texts:
            printed[text] = float(prob)
    assert list(printed) == texts

    # The oracle (no transformers code) on the same clip and texts.
    with torch.no_grad():
        pixel_values = preprocess_video(load_video(clip, hyper.frames), hyper.image_size)
        logits = original_forward(state_dict, pixel_values, encode_texts(texts))["logits"]
    expected = logits.softmax(dim=1)[0].tolist()
    assert max(expected) - min(expected) > 0.05, expected  # distinct, so an order mix-up shows
    assert [printed[t] for t in texts] == pytest.approx(expected, abs=1e-3)


def test_video_needs_the_clip_vocabulary(golden_config, tmp_path, capsys):
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert run("--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config, "--video", clip) == 2
    assert "120 tokens" in capsys.readouterr().err


def test_a_folder_written_before_the_classification_failed_is_said(golden_config, tmp_path, capsys):
    """The vocabulary is known only once the model is converted: the folder is written by then."""
    clip, out = tmp_path / "clip.npy", tmp_path / "out"
    np.save(clip, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config, "--output", out]
    assert run(*args, "--video", clip) == 2
    assert f"wrote {out}" in capsys.readouterr().out and (out / "config.json").is_file()


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def whoami(self):
        return {"name": "alice"}

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in kwargs["folder_path"].iterdir())
        FakeApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs["create_pr"], files))
        return "https://hub.example/commit"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi.calls


def test_push_to_hub_uploads_the_verified_folder_in_one_commit(fake_hub, golden_config, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config, "--output", out]
    assert run(*args, "--push-to-hub", "org/xclip-tiny", "--create-pr", "--private") == 0
    assert fake_hub[0] == (
        "create_repo",
        "org/xclip-tiny",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    kind, repo, pr, files = fake_hub[1]
    assert (kind, repo, pr) == ("upload_folder", "org/xclip-tiny", True)
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= set(files)
    assert len(fake_hub) == 2
    # Publishing records the local source's digest in the card.
    assert sha256_file(helpers.checkpoint("tiny-a")) in (out / "README.md").read_text()


def _upload_dropped() -> RuntimeError:
    """What huggingface_hub raises when the upload of a file fails: a RuntimeError around the cause."""
    try:
        raise ConnectionError("connection dropped")
    except ConnectionError as cause:
        error = RuntimeError("Error while uploading 'model.safetensors' to the Hub.")
        error.__cause__ = cause
        return error


def _forbidden() -> Exception:
    import importlib

    from huggingface_hub.errors import HfHubHTTPError, Response

    http = importlib.import_module(Response.__module__)  # httpx's or httpx2's, as huggingface_hub uses
    answer = Response(403, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    message = "You don't have the rights to create a model under the namespace org"
    return HfHubHTTPError("(Request ID: Root=1-abc)", response=answer, server_message=message)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (_upload_dropped, "Error while uploading 'model.safetensors' to the Hub. (connection dropped)"),
        (_forbidden, "HTTP 403: You don't have the rights to create a model under the namespace org"),
    ],
    ids=["upload-dropped", "forbidden"],
)
def test_a_failed_push_says_why_in_one_line(fake_hub, golden_config, monkeypatch, capsys, error, said):
    """huggingface_hub's first line is a request id, and a failed upload a bare RuntimeError."""

    def fails(self, **kwargs):
        raise error()

    monkeypatch.setattr(FakeApi, "upload_folder", fails)
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config]
    assert run(*args, "--push-to-hub", "org/x") == 2
    err = capsys.readouterr().err
    assert (
        err.splitlines()[-1]
        == f"xclip-convert: error: pushing to org/x failed: {said}; nothing was published"
    )


def test_push_without_a_hub_fails_before_the_work(fake_hub, golden_config, tmp_path, monkeypatch, capsys):
    """No token or no network: refused at once, not after minutes of conversion."""

    def offline(self):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(FakeApi, "whoami", offline)
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config]
    assert run(*args, "--output", tmp_path / "out", "--push-to-hub", "org/xclip-tiny") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "xclip-convert: error: cannot push to org/xclip-tiny ([Errno -2] Name or service not known): log in "
        "with `hf auth login` or HF_TOKEN, and check the network"
    )
    assert "load:" not in err and fake_hub == [] and not (tmp_path / "out").exists()


def test_push_defaults_to_the_users_namespace_and_old_flag(fake_hub, monkeypatch):
    """`--push_to_hub` without a repo id resolves <user>/<model name> before any work starts."""
    from converter import pipeline

    events = []
    monkeypatch.setattr(FakeApi, "whoami", lambda self: events.append("whoami") or {"name": "alice"})

    def work(*args, **kwargs):
        events.append(("work", kwargs.get("repo_id")))
        raise ConverterError("stop here")

    monkeypatch.setattr(pipeline, "convert_checkpoint", work)
    assert run("--model-name", "xclip-base-patch32", "--push_to_hub") == 2
    # Asked of the hub first, and the answer is what the work publishes to.
    assert events == ["whoami", ("work", "alice/xclip-base-patch32")]


def test_push_is_refused_without_verification(fake_hub, golden_config, capsys):
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config, "--no-verify"]
    assert run(*args, "--push-to-hub", "org/x") == 2
    assert "verified" in capsys.readouterr().err and fake_hub == []


def test_a_push_without_output_does_not_say_nothing_was_written(fake_hub, golden_config, capsys):
    """The pushed folder is the output: stdout names the push and no missing --output."""
    args = ["--checkpoint", helpers.checkpoint("tiny-a"), "--config", golden_config]
    assert run(*args, "--push-to-hub", "org/xclip-tiny") == 0
    captured = capsys.readouterr()
    assert "pushed to org/xclip-tiny: https://hub.example/commit" in captured.out
    assert "nothing written" not in captured.out + captured.err


def test_the_library_publishes_only_a_verification_that_ran_and_passed(fake_hub, golden_config):
    """pipeline.push refuses a result converted with verify=False, and one whose verification failed."""
    from converter.pipeline import convert_checkpoint, push

    unverified = convert_checkpoint(helpers.checkpoint("tiny-a"), config=golden_config, verify=False)
    failed = helpers.compare({"logits": torch.tensor([1.0])}, {"logits": torch.tensor([2.0])}, 1e-4)
    assert not failed.passed
    for result in (unverified, dataclasses.replace(unverified, verification=failed)):
        with pytest.raises(ConverterError, match="^only verified conversions are published"):
            push(result, "org/x")
    assert fake_hub == []


def test_the_library_publishes_the_folder_a_conversion_wrote(golden_config, tmp_path, monkeypatch):
    """A result written with `output` is pushed from that folder, as verified and written, not rewritten."""
    from converter import hub
    from converter.pipeline import convert_checkpoint, push

    pushed = []
    monkeypatch.setattr(hub, "push_folder", lambda folder, repo_id, **kw: pushed.append(folder) or "url")
    out = tmp_path / "out"
    result = convert_checkpoint(helpers.checkpoint("tiny-a"), config=golden_config, output=out)
    assert push(result, "org/x") == "url" and pushed == [out]


def test_a_malformed_pin_is_refused_before_any_download(fast_network, capsys):
    with LoopbackServer({"/x.pth": b"weights"}) as server:
        assert run("--checkpoint", server.url("/x.pth"), "--sha256", "xyz") == 2
        assert server.hits_for("/x.pth") == []
    err = capsys.readouterr().err
    assert "--sha256 'xyz'" in err and "64 hexadecimal digits" in err and "Traceback" not in err


def test_a_quota_page_is_one_line_and_nothing_is_cached(fast_network, tmp_path, capsys):
    page = (
        b"<html><head><title>Google Drive - Quota exceeded</title></head><body>Too many users</body></html>"
    )
    with LoopbackServer({"/x.pth": page}) as server:
        server.set_always("/x.pth", Fault(content_type="text/html"))
        assert run("--checkpoint", server.url("/x.pth"), "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "Google Drive quota" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_push_target_without_repo_or_model_name_is_refused_before_asking_the_hub(monkeypatch) -> None:
    from huggingface_hub import HfApi

    from converter.hub import push_target

    def whoami(self: HfApi) -> dict[str, str]:
        raise AssertionError("the hub was asked before the arguments were checked")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    with pytest.raises(ConverterError, match="--push-to-hub needs a REPO_ID when --model-name is not given"):
        push_target(None, None)
