"""The command line: exit codes, atomic output, flags, and the user-facing errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, XCLIPModel

from converter.config import to_config
from converter.processing import build_image_processor
from converter.synthetic import make_state_dict
from tests import helpers
from tests.helpers import SQUARE, run


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden")
    return helpers.checkpoint("tiny-a"), helpers.write_config("tiny-a", folder)


def test_output_loads_offline_without_missing_or_unexpected_keys(golden, tmp_path, monkeypatch):
    checkpoint, config = golden
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", out) == 0
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "processor_config.json",
        "tokenizer.json",
    } <= set(files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, info = XCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # The processor saved with the model is the one we configure, and loads offline.
    processor = AutoProcessor.from_pretrained(out)
    frames = np.random.default_rng(0).integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)
    got = processor(text=["eating spaghetti"], videos=list(frames), return_tensors="pt", padding=True)
    want = build_image_processor(32)(list(frames), return_tensors="pt", input_data_format="channels_last")
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert got["input_ids"][0].tolist() == [49406, 4371, 18440, 49407]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "verification" in card.lower() and "sha256" in card
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_an_over_long_text_is_refused_before_the_work(golden, tmp_path, capsys):
    checkpoint, config = golden
    clip = tmp_path / "clip.npy"
    np.save(clip, np.zeros((4, 32, 32, 3), np.uint8))
    assert run("--checkpoint", checkpoint, "--config", config, "--video", clip, "--texts", "word " * 80) == 2
    out, err = capsys.readouterr()
    assert out == "" and "stage" not in err and "load:" not in err  # no stage ran
    assert err.splitlines()[-1].startswith("xclip-convert: error: text 'word word")
    assert err.splitlines()[-1].endswith(
        "is 82 tokens long; CLIP allows at most 77 (including start/end tokens): shorten it."
    )


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_a_console_that_is_not_utf8_gets_every_line(golden, tmp_path, encoding):
    """The results hold Δ, ≠ and ×: where stdout cannot encode them (a Windows log file, PYTHONIOENCODING)
    they are written escaped, and the run succeeds as it did."""
    import os

    checkpoint, config = golden
    command = [sys.executable, "-m", "converter", "--checkpoint", checkpoint, "--config", config]
    env = {**os.environ, "PYTHONIOENCODING": encoding}
    done = subprocess.run([*command, "--output", tmp_path / "out"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "max |\\u0394| logits" in done.stdout and done.stdout.rstrip().endswith(
        f"wrote {tmp_path / 'out'}"
    )


def test_a_reader_that_goes_away_ends_the_run_as_sigpipe_silently():
    """`xclip-convert --list | head -0`: exit 141, as the shell's own tools end, and no traceback."""
    command = [sys.executable, "-m", "converter", "--list"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as done:
        done.stdout.close()  # before it writes a line
        assert (done.wait(), done.stderr.read()) == (141, b"")


def test_an_audits_report_is_written_though_its_reader_goes_away(golden, tmp_path):
    """`--audit ... --report r.json | head -0`: the report is the work, the printed lines the results."""
    checkpoint, config = golden
    assert run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out") == 0
    audit = [
        "--audit",
        tmp_path / "out",
        "--checkpoint",
        checkpoint,
        "--config",
        config,
        "--report",
        tmp_path / "r.json",
    ]
    command = [sys.executable, "-m", "converter", *map(str, audit)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as done:
        done.stdout.close()
        assert done.wait() == 141, done.stderr.read()
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


def test_old_flag_names_still_work(golden, tmp_path):
    checkpoint, config = golden
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--config", config, "--pytorch_dump_folder_path", out) == 0
    assert (out / "model.safetensors").exists()


def test_existing_output_is_kept_unless_overwrite(golden, tmp_path, capsys):
    checkpoint, config = golden
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("--checkpoint", checkpoint, "--config", config, "--output", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(golden, tmp_path, dtype):
    checkpoint, config = golden
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", out, "--dtype", dtype) == 0
    model = XCLIPModel.from_pretrained(out, dtype="auto")
    assert model.logit_scale.dtype == getattr(torch, dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_reduced_dtypes_distance_from_float32_is_printed_and_carded(golden, tmp_path, capsys, dtype):
    """float16 is measured against the float32 original too: on stdout and in the card, as figures; a
    float32 run has no second comparison to report."""
    checkpoint, config = golden
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--config", config, "--output", out, "--dtype", dtype) == 0
    printed = capsys.readouterr().out
    card = (out / "README.md").read_text()
    if dtype == "float32":
        assert "vs the float32 original" not in printed and "from float32" not in card
        return
    said = re.search(
        r"written float16 model vs the float32 original \(reported, not gated\): max \|Δ\| (.*)", printed
    )
    assert said, printed
    figures = dict(item.split(" ") for item in said.group(1).split(", "))
    assert "logits" in figures
    assert "| output | max abs difference from float32 |" in card
    assert f"| logits | {figures['logits']} |" in card


def test_the_atol_given_is_the_one_verified_with(golden, capsys):
    checkpoint, config = golden
    assert run("--checkpoint", checkpoint, "--config", config, "--atol", "0.03") == 0
    assert "compared, atol 0.03 x each site's max |value|)" in capsys.readouterr().out


def test_disk_full_while_writing_the_weights_exits_2_and_leaves_nothing(
    golden, tmp_path, monkeypatch, capsys
):
    import errno

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    checkpoint, config = golden
    assert run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "model.safetensors" in err and "No space left" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, capsys):
    """A config with 8 MIT/prompt heads where the original has E // 64 = 12 (the old L/14 bug)."""
    # Every width >= 64, so the oracle uses the original's width // 64 rule: 1, 1, 12, 12 heads.
    hyper = dataclasses.replace(
        SQUARE, embed_dim=768, text_width=64, vision_heads=1, text_heads=1, mit_heads=12, mit_mlp=3072,
        prompt_heads=12,
    )  # fmt: skip
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"model": make_state_dict(hyper, seed=2)}, checkpoint)
    to_config(hyper).save_pretrained(tmp_path / "right")
    to_config(dataclasses.replace(hyper, mit_heads=8, prompt_heads=8)).save_pretrained(tmp_path / "wrong")
    assert run("--checkpoint", checkpoint, "--config", tmp_path / "right" / "config.json") == 0  # heads alone
    out = tmp_path / "out"
    assert (
        run("--checkpoint", checkpoint, "--config", tmp_path / "wrong" / "config.json", "--output", out) == 1
    )
    assert "verification FAILED" in capsys.readouterr().out
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "right", "wrong"]


def test_no_verify_skips_the_oracle(golden, tmp_path, monkeypatch):
    import converter.verify

    def oracle_must_not_run(*args, **kwargs):
        raise AssertionError("verification ran under --no-verify")

    monkeypatch.setattr(converter.verify, "verify", oracle_must_not_run)
    checkpoint, config = golden
    assert (
        run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out", "--no-verify") == 0
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # ... and the same patch is noticed when verification is on, so the check above can fail.
    assert run("--checkpoint", checkpoint, "--config", config, "--output", tmp_path / "out2") == 2


def test_wrong_model_name_names_the_fields(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pth"
    torch.save(make_state_dict(SQUARE, seed=1), checkpoint)
    assert (
        run("--checkpoint", checkpoint, "--model-name", "xclip-base-patch32", "--output", tmp_path / "o") == 2
    )
    err = capsys.readouterr().err
    assert "does not look like xclip-base-patch32" in err
    assert "frames: 3 vs 8" in err and "patch_size: 8 vs 32" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_config_that_disagrees_with_the_shapes(golden, tmp_path, capsys):
    checkpoint, _ = golden
    config = helpers.write_config("tiny-b", tmp_path)  # 8 frames, 48 px: tiny-a has 4 frames, 32 px
    assert run("--checkpoint", checkpoint, "--config", config) == 2
    err = capsys.readouterr().err
    assert "mit.position_embedding: checkpoint gives [1, 4, 32], config expects [1, 8, 32]" in err


def test_heads_below_64_need_a_config(golden, capsys):
    checkpoint, _ = golden
    assert run("--checkpoint", checkpoint) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to convert"),
        (["--checkpoint", "/nonexistent/x.pth"], "no such file"),
        (["--model-name", "xclip-huge"], "unknown model name 'xclip-huge'"),
        (["--show-config"], "--show-config needs --model-name"),
    ],
)
def test_bad_input_exits_2_with_one_message(args, message, capsys):
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_and_show_config(capsys):
    assert run("--list") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 18
    assert run("--model-name", "xclip-large-patch14-16-frames", "--show-config") == 0
    config = json.loads(capsys.readouterr().out)
    assert config["vision_config"]["image_size"] == 336 and config["vision_config"]["num_frames"] == 16
    assert config["prompt_num_attention_heads"] == 12
    assert config["vision_config"]["mit_num_attention_heads"] == 12


def test_the_shown_config_names_its_class_and_is_one_config_accepts(capsys, tmp_path):
    """--show-config prints a config.json as the converter writes it: from_pretrained and the Hub read
    the class from "architectures", and --config takes the file back as it is."""
    from converter.config import load_config_file

    assert run("--model-name", "xclip-base-patch32", "--show-config") == 0
    shown = capsys.readouterr().out
    assert json.loads(shown)["architectures"] == ["XCLIPModel"]
    (tmp_path / "config.json").write_text(shown)
    assert load_config_file(tmp_path / "config.json").architectures == ["XCLIPModel"]


def test_python_dash_m_and_console_script_agree():
    import shutil

    script = shutil.which("xclip-convert", path=str(Path(sys.executable).parent)) or shutil.which(
        "xclip-convert"
    )
    assert script, "the xclip-convert console script is not installed (pip install -e .)"
    by_module = subprocess.run([sys.executable, "-m", "converter", "--list"], capture_output=True, text=True)
    by_script = subprocess.run([script, "--list"], capture_output=True, text=True)
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout == by_script.stdout and "xclip-base-patch16-zero-shot" in by_script.stdout


_IMPORT_ORDER_PROBE = """
import json, sys
import converter.export as export
import converter.load as load

events, seen = [], {}

def recorded(module, name, before, after=None):
    function = getattr(module, name)
    def probe(*args, **kwargs):
        events.append(before)
        if name == "weights_written_meanwhile":  # the main thread, as the writer is started
            seen["transformers_before_write"] = "transformers" in sys.modules
        result = function(*args, **kwargs)
        if after:
            events.append(after)
        return result
    setattr(module, name, probe)

recorded(export, "weights_written_meanwhile", "writer started")
recorded(export, "write_weights", "write starts", "write ends")  # on the writer's thread
recorded(load, "check_finite", "NaN/inf pass")
from converter.cli import main

rc = main(sys.argv[1:])
seen["modelling_imported"] = "transformers.models.x_clip.modeling_x_clip" in sys.modules
print(json.dumps({"rc": rc, "events": events, **seen}))
"""


def test_the_weights_start_writing_before_transformers_is_imported(tmp_path):
    """What the performance rests on: mapping needs torch only, so the weights are written while
    transformers is imported; --no-verify never loads transformers' modelling code; and the NaN/inf
    pass over the checkpoint comes after the write, not before it (it made the write slower)."""
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"model": make_state_dict(SQUARE, seed=1)}, checkpoint)
    command = [sys.executable, "-c", _IMPORT_ORDER_PROBE, "--checkpoint", str(checkpoint), "--output"]
    result = subprocess.run([*command, str(tmp_path / "out"), "--no-verify"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "rc": 0,
        "events": ["writer started", "write starts", "write ends", "NaN/inf pass"],
        "transformers_before_write": False,
        "modelling_imported": False,
    }
    assert XCLIPModel.from_pretrained(tmp_path / "out") is not None


def test_the_cli_offers_exactly_the_dtypes_the_library_writes():
    # cli.py names them without importing torch (fast --help/--list); the pipeline maps them.
    from converter import cli, pipeline

    assert cli.DTYPES == tuple(pipeline.DTYPES)


@pytest.mark.parametrize("dtype", ["float64", "int8", torch.int8])
def test_the_library_names_an_unknown_dtype(dtype):
    from converter.errors import ConverterError
    from converter.pipeline import convert_checkpoint

    with pytest.raises(ConverterError, match="dtype must be one of float32, float16, bfloat16, got"):
        convert_checkpoint("never-read.pth", dtype=dtype)


@pytest.mark.parametrize("atol", [0, 1, 1.5, -1e-4, float("nan"), float("inf"), "1e-4"])
def test_the_library_refuses_an_atol_out_of_range_before_any_work(atol):
    """convert_checkpoint checks atol as the command line does: 1 or more would pass a site of zeros."""
    from converter.errors import ConverterError
    from converter.pipeline import convert_checkpoint

    with pytest.raises(ConverterError, match="^--atol must be a finite number above 0 and below 1 .*, got "):
        convert_checkpoint("never-read.pth", atol=atol)


def test_a_model_names_conversion_is_named_and_carded_as_that_model(golden, tmp_path, monkeypatch):
    """With --model-name the result and the card take the variant's name (and its training data), not
    the checkpoint file's stem. The golden is far smaller than the variant: its size check is skipped."""
    from converter import pipeline

    checkpoint, config = golden
    monkeypatch.setattr(pipeline, "check_variant", lambda *args: None)
    result = pipeline.convert_checkpoint(
        checkpoint, model_name="xclip-base-patch32", config=config, verify=False, output=tmp_path / "out"
    )
    assert result.name == "xclip-base-patch32"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "xclip-base-patch32" in card and "Trained on Kinetics-400." in card


def test_a_local_checkpoints_origin_is_its_file_name_alone(golden):
    """The result's provenance, which a card or a message may quote, never holds the user's folders."""
    from converter.pipeline import convert_checkpoint

    checkpoint, config = golden
    result = convert_checkpoint(checkpoint.resolve(), config=config, verify=False)
    assert result.provenance.origin == checkpoint.name
    assert result.provenance.path == checkpoint.resolve()


@pytest.mark.parametrize("status", [0, 2])
def test_a_signal_during_shutdown_keeps_the_commands_status(status):
    """A SIGTERM while Python shuts down (here: an atexit hook) ends the process with the status it was
    exiting with, not 143 and not another status."""
    code = (
        "import atexit, os, signal, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
        "from converter.cli import exit_with\n"
        f"exit_with({status})\n"
    )
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ended.returncode == status, ended.stderr


def test_results_and_progress_keep_their_order_in_one_log(golden, tmp_path):
    """`xclip-convert ... > log 2>&1`: stdout is written line by line, so each result lands where it was
    said, among the progress lines, and not all at exit after them."""
    checkpoint, config = golden
    command = [sys.executable, "-m", "converter", "--checkpoint", checkpoint, "--config", config]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    ran = subprocess.run(
        [*map(str, command), "--output", str(tmp_path / "out")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    lines = ran.stdout.splitlines()
    assert ran.returncode == 0, ran.stdout
    wrote = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    start_up = next(i for i, line in enumerate(lines) if line.startswith("xclip-convert: start-up: "))
    assert wrote < start_up, lines


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_during_the_job_exits_with_its_own_status(capsys, signum, status):
    """EPILOG's 130/143/129: each signal its status, not Ctrl-C's for all."""
    from converter.cli import run_job

    def job() -> int:
        os.kill(os.getpid(), signum)
        time.sleep(30)
        return 0

    assert run_job(job) == status
    assert capsys.readouterr().err == f"xclip-convert: interrupted by {signal.Signals(signum).name}\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_stream_that_cannot_be_written_is_named_as_that_stream(monkeypatch, stream):
    """say() names the stream it failed to write, not the file a job had open meanwhile."""
    import errno

    from converter import cli

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/else")

        def flush(self):
            pass

    monkeypatch.setattr(sys, stream, Full())
    with pytest.raises(OSError) as failed:
        cli.say("a result", getattr(sys, stream))
    assert failed.value.filename == f"<{stream}>" and failed.value.errno == errno.ENOSPC


@pytest.mark.parametrize("quiet", [[], ["-q"]])
def test_main_leaves_the_library_logging_as_it_found_it(capsys, quiet):
    """A library call after main() in the same process logs at the level it did before."""
    import logging

    from converter import cli

    logger = logging.getLogger("converter")
    before = (logger.level, list(logger.handlers))
    assert cli.main([*quiet, "--list"]) == 0
    assert (logger.level, list(logger.handlers)) == before


@pytest.mark.parametrize("debug", ["", "0", "1"])
def test_a_bug_of_ours_is_one_line_unless_xclip_debug_is_on(monkeypatch, capsys, debug):
    from converter.cli import run_job

    monkeypatch.setenv("XCLIP_DEBUG", debug)

    def bug() -> int:
        raise RuntimeError("a bug")

    if debug == "1":
        with pytest.raises(RuntimeError, match="a bug"):
            run_job(bug)
        return
    assert run_job(bug) == 2
    assert capsys.readouterr().err == (
        "xclip-convert: internal error: RuntimeError: a bug (rerun with XCLIP_DEBUG=1 and report it)\n"
    )


@pytest.mark.parametrize("stdout", ["> /dev/full", ">&-"])
def test_a_stdout_that_cannot_be_written_is_named_or_left_alone(stdout):
    """A full disk under stdout is named as stdout, not as a file the job wrote; a closed one is no bug."""
    command = f"{shlex.quote(sys.executable)} -m converter --list {stdout}"
    run = subprocess.run(
        command, shell=True, capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120
    )
    if stdout == ">&-":
        assert run.returncode == 0 and run.stderr == "", run.stderr
    else:
        assert (
            run.returncode == 2 and run.stderr == "xclip-convert: error: <stdout>: No space left on device\n"
        )


@pytest.mark.parametrize("command", ["converter --list", "converter.synthetic xclip-base-patch32 k.pth"])
def test_a_full_stdout_is_named_once_with_a_buffered_stdout(tmp_path, command):
    """Without PYTHONUNBUFFERED (a user's shell) the lines stdout could not write stay in its buffer; Python's
    exit would flush them again, print 'Exception ignored' and end with 120 instead of the 2 EPILOG gives."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    python = shlex.quote(sys.executable)
    run = subprocess.run(
        f"{python} -m {command} > /dev/full",
        shell=True,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.endswith("error: <stdout>: No space left on device\n"), run.stderr
    assert "Exception ignored" not in run.stderr


@pytest.mark.parametrize(
    "job",
    [
        "converter --checkpoint k.pth",
        "converter --show-config --model-name xclip-base-patch32",
        "converter.synthetic xclip-base-patch32 k.pth",
    ],
)
def test_a_current_folder_that_was_removed_is_named(tmp_path, job):
    """torch's libraries cannot load from it: the oneMKL error would point at the torch install."""
    python = shlex.quote(sys.executable)
    command = f"mkdir gone && cd gone && rmdir ../gone && {python} -m {job}"
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.endswith(": error: the current folder no longer exists: cd to one that does\n"), (
        run.stderr
    )


def test_a_locale_that_is_not_utf8_is_named_for_a_name_torch_would_open_wrong(tmp_path):
    """In the C locale without UTF-8 mode, a UTF-8 file name reaches torch as other bytes."""
    (tmp_path / "données.pth").write_bytes(helpers.checkpoint("tiny-a").read_bytes())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    command = [sys.executable, "-m", "converter", "--checkpoint", "données.pth"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    said = "the locale's encoding (ascii) is not UTF-8, and torch and safetensors open names as UTF-8"
    assert f"{said}: run with PYTHONUTF8=1" in run.stderr, run.stderr


def test_version_is_the_package_version(capsys):
    import converter

    with pytest.raises(SystemExit) as done:
        run("--version")
    assert done.value.code == 0 and capsys.readouterr().out == f"xclip-convert {converter.__version__}\n"


def test_help_shows_defaults_exit_codes_and_environment(capsys):
    from converter.verify import DEFAULT_ATOL

    with pytest.raises(SystemExit):
        run("--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "(default: float32)" in text and f"(default: {DEFAULT_ATOL:g})" in text
    assert "(default: playing sports, eating spaghetti, go shopping)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # only real defaults
    for code in (
        "0 converted, verified and written",
        "1 a verification ran and failed",
        "2 any other refusal",
    ):
        assert code in text
    assert "130/143/129 interrupted" in text
    for variable in ("XCLIP_CACHE", "XCLIP_RELEASE_URL", "HF_TOKEN", "XCLIP_DEBUG"):
        assert f"{variable} " in text


@pytest.mark.parametrize("quiet", [False, True])
def test_without_output_the_run_says_so_before_the_work(golden, capsys, quiet):
    checkpoint, config = golden
    assert run("--checkpoint", checkpoint, "--config", config, *(["-q"] if quiet else [])) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == "xclip-convert: no --output: nothing will be written"
    if not quiet:  # then the stages, and last the start-up and the total: the times add up
        assert [line.split(":")[1].strip() for line in err[1:]] == [
            "config",
            "fetch",
            "load",
            "map",
            "verify",
            "start-up",
        ]
        start_up, total = re.fullmatch(
            r"xclip-convert: start-up: Python, the imports and the checks of the flags, before the first "
            r"stage \((\d+\.\d) s\); (\d+\.\d) s in all",
            err[-1],
        ).groups()
        stages = sum(float(re.search(r"\((\d+\.\d) s\)$", line)[1]) for line in err[1:-1])
        unaccounted = float(total) - float(start_up) - stages
        assert -0.4 < unaccounted < 1.0  # each figure rounded to 0.1 s; the results printed at the end
    else:
        assert len(err) == 1
    assert captured.out.splitlines()[-1] == "no --output given: nothing written"


def test_start_up_is_measured_from_the_process_start():
    probe = (
        "import time; time.sleep(0.5); from converter import cli; print(cli._seconds_since_process_start())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert 0.5 <= float(done.stdout) < 30


def test_start_up_is_no_longer_than_the_process_has_lived():
    """The figure is the child's age when asked: at most the time the parent saw it run (plus the
    clock's tick), so a start-up line never claims seconds that did not pass."""
    probe = "from converter import cli; print(cli._seconds_since_process_start())"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    lived = time.monotonic() - began
    assert 0 < float(done.stdout) <= lived + 0.05, (done.stdout, lived)
