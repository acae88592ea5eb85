"""`xclip-convert`: argparse around the library (`pipeline`, `audit`, `to_original`) and the one mapping
from what went wrong to an exit status (EPILOG). Results go to stdout, progress to stderr; every line
printed has its control characters escaped, so nothing read from a file or a server can forge a line.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from converter import DEFAULT_ATOL, DEFAULT_TEXTS, DTYPES, __version__
from converter.errors import ConverterError, VerificationError, escape, reason
from converter.registry import VARIANTS, get_variant

if TYPE_CHECKING:
    import torch

    from converter.pipeline import ConversionResult

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PROG = "xclip-convert"
EPILOG = """\
exit status:
  0            converted, verified and written (--audit: the published model matches)
  1            a verification ran and failed; nothing written (--audit: a mismatch, named)
  2            any other refusal: one line naming the file, key or flag, and what to do
  130/143/129  interrupted by Ctrl-C / SIGTERM / SIGHUP; nothing left behind
  141          stdout's reader went away (`| head`): the results were cut short, not the work

environment:
  XCLIP_CACHE        where fetched checkpoints are kept (default: ~/.cache/xclip-converter)
  XCLIP_RELEASE_URL  a mirror holding the released checkpoints by file name, fetched from instead
                     of the release (the model card still cites the release)
  HF_TOKEN           hub token for --push-to-hub and private repos (or `hf auth login` once)
  HF_HUB_OFFLINE     1: never contact the hub (--audit and --to-original read the local HF cache)
  XCLIP_DEBUG        1: show the traceback of an internal error
"""
_IMPORTED = time.perf_counter()  # where start-up is measured from when /proc cannot tell

# The flags each job reads (argparse dests); any other flag given is refused, naming the job.
JOB_FLAGS = {
    "convert": "quiet atol checkpoint model_name config sha256 force_download output overwrite dtype "
    "push_to_hub create_pr private no_verify video texts",
    "audit": "quiet atol audit checkpoint model_name config sha256 report revision push_to_hub create_pr",
    "to_original": "quiet atol to_original output overwrite revision",
    "list": "quiet list",
    "show_config": "quiet show_config model_name",
}


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The flags; with `defaults=False` a flag not given stays unset: which were given, whatever value."""
    unset = argparse.SUPPRESS
    parser = argparse.ArgumentParser(
        prog=PROG,
        argument_default=None if defaults else unset,
        description="Convert an original X-CLIP checkpoint to a transformers XCLIPModel folder and "
        "verify it against an independent implementation of the original forward pass.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add = parser.add_argument_group("source").add_argument
    add("--checkpoint", metavar="PATH|URL", help="original checkpoint: a local file or URL")
    add(
        "--model-name",
        "--model_name",
        metavar="NAME",
        help="a published variant (see --list): fetched when --checkpoint is absent, and the "
        "checkpoint must match its registry config",
    )
    add("--config", metavar="FILE", help="XCLIPConfig JSON instead of inferring it from weights")
    add("--sha256", metavar="HEX", help="pin the checkpoint's sha256 (64 hex digits)")
    add("--force-download", action="store_true", help="fetch again even if $XCLIP_CACHE holds the checkpoint")
    add = parser.add_argument_group("output").add_argument
    add("--output", "--pytorch_dump_folder_path", metavar="DIR", help="folder to write (--to-original: .pth)")
    add("--overwrite", action="store_true", help="replace an existing --output")
    dtype = "float32" if defaults else unset
    add("--dtype", choices=DTYPES, default=dtype, help="written weights' dtype (default: %(default)s)")
    add(
        "--push-to-hub",
        "--push_to_hub",
        nargs="?",
        const="",
        metavar="REPO_ID",
        help="upload the verified folder (default repo: <your user>/<model name>)",
    )
    add("--create-pr", action="store_true", help="with --push-to-hub: open a pull request")
    add("--private", action="store_true", help="with --push-to-hub: create the repo private")
    add = parser.add_argument_group("verification").add_argument
    add("--no-verify", action="store_true", help="skip the comparison with the original forward pass")
    add(
        "--atol",
        type=float,
        default=DEFAULT_ATOL if defaults else unset,
        help="largest difference allowed, relative to each output's magnitude (default: %(default)s)",
    )
    add("--video", metavar="PATH", help="a clip (.npy frames or a video file) to classify")
    add(
        "--texts", nargs="+", metavar="TEXT", help=f"labels for --video (default: {', '.join(DEFAULT_TEXTS)})"
    )
    other = parser.add_argument_group("other jobs")
    add = other.add_argument
    job = other.add_mutually_exclusive_group().add_argument  # one job a run
    job(
        "--audit",
        metavar="SOURCE",
        help="check a published X-CLIP (folder or hub repo id) against --model-name or --checkpoint",
    )
    add("--report", metavar="FILE", help="with --audit: write the findings as JSON")
    add("--revision", metavar="REV", help="with --audit or --to-original: SOURCE's hub revision")
    job("--list", action="store_true", help="list the published variants and exit")
    job("--show-config", action="store_true", help="print --model-name's XCLIPConfig and exit")
    job("--to-original", metavar="SOURCE", help="convert a transformers X-CLIP back to --output FILE.pth")
    add("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = list(vars(build_parser(defaults=False).parse_args(argv)))  # `--dtype float32` too
    logger = logging.getLogger("converter")
    level = logger.level
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    progress = logging.StreamHandler(sys.stderr)  # this run's stderr: main() may run again in one process
    progress.setFormatter(_EscapedLines(f"{PROG}: %(message)s"))
    logger.addHandler(progress)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # a warning a retry; our own lines say what failed
    try:
        return run_job(lambda: _run(args, given))
    finally:
        logger.removeHandler(progress)  # a library call after main() logs as usual
        logger.setLevel(level)


def exit_with(status: int) -> NoReturn:
    """End a command with `status`. Python's shutdown (torch's) takes a moment: a signal then ends it at
    once with that status, instead of turning a finished run into 'interrupted' (143) without a word."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: os._exit(status))
    try:  # what stdout still holds (a full disk, named already) would fail again at exit, as status 120
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        _discard_stdout()
    sys.exit(status)


def console_main() -> NoReturn:
    """The `xclip-convert` command."""
    exit_with(main())


def run_job(job: Callable[[], int], prog: str = PROG) -> int:
    """`job()`'s exit status, with signals as exceptions; a failure is one line on stderr and the status
    EPILOG gives it (the traceback of a bug of ours with XCLIP_DEBUG=1)."""
    from converter.export import Interrupted, signal_raised, signals_as_exceptions

    for stream in (sys.stdout, sys.stderr):  # a console or log that is not UTF-8: Δ written as \u0394
        if isinstance(stream, io.TextIOWrapper):  # line by line: a full disk is met in `say`, named
            stream.reconfigure(errors="backslashreplace", line_buffering=True)

    def fail(message: str, status: int = EXIT_BAD_INPUT) -> int:
        say(f"{prog}: {message}", sys.stderr)
        return status

    try:
        with signals_as_exceptions():
            try:  # torch's libraries fail to load from a folder that is gone, with an error naming torch
                os.getcwd()
            except FileNotFoundError:
                raise ConverterError("the current folder no longer exists: cd to one that does") from None
            status = job()
            if sys.stdout is not None:  # None: closed (`>&-`), nothing to flush
                sys.stdout.flush()  # a reader that is gone (`| head`) is met here, not at exit
            return status
    except BrokenPipeError:  # stdout's reader is gone: stop silently, as shell tools do
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except ConverterError as err:
        return fail(f"error: {err}")
    except VerificationError as err:
        if err.verification is not None:
            say(err.verification.summary())
        return fail(str(err), EXIT_VERIFICATION_FAILED)
    except Interrupted as err:
        return fail(str(err), err.exit_code)
    except OSError as err:  # disk full, permissions, a path that is not a folder, ...
        where = f"{escape(str(err.filename))}: " if err.filename else ""
        return fail(f"error: {where}{err.strerror or reason(err)}")
    except Exception as err:
        if signum := signal_raised():  # not a bug of ours: what the signal broke midway
            return fail(str(Interrupted(signum)), 128 + signum)
        if os.environ.get("XCLIP_DEBUG", "0") not in ("", "0"):  # 0 says off, as 1 says on
            raise
        return fail(
            f"internal error: {type(err).__name__}: {reason(err)} (rerun with XCLIP_DEBUG=1 and report it)"
        )


def say(text: str, file: TextIO | None = None) -> None:
    """A result on stdout (or `file`), each line's control characters escaped; a stream that cannot be
    written (`> /dev/full`) is named as such, not as the file a job was writing meanwhile."""
    try:
        print("\n".join(escape(line) for line in text.splitlines()), file=file)
    except BrokenPipeError:
        raise
    except OSError as err:
        raise OSError(
            err.errno, err.strerror, "<stdout>" if file in (None, sys.stdout) else "<stderr>"
        ) from None


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that what it still buffers is dropped when Python exits."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _EscapedLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(escape(line) for line in super().format(record).splitlines())


def _seconds_since_process_start() -> float:
    """From the kernel's record of this process's start (Linux), else from this module's import: what
    Python, the imports (torch) and the checks of the flags took before the first stage."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22 is the start time in clock ticks since boot; the name (field 2) may hold spaces.
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return max(0.0, float(uptime.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def _log_times(start_up: float) -> None:
    """The last progress line of a run that worked: with it the stages' times add up to the run's."""
    logging.getLogger("converter").info(
        "start-up: Python, the imports and the checks of the flags, before the first stage (%.1f s); "
        "%.1f s in all",
        start_up,
        _seconds_since_process_start(),
    )


def _run(args: argparse.Namespace, given: list[str]) -> int:
    """Run the job the flags name, refusing first, before any work, what the flags alone show wrong."""
    jobs = {"list": _list, "show_config": _show_config, "audit": _audit, "to_original": _to_original}
    # An empty value (`--video "$CLIP"` with CLIP unset) names nothing; --push-to-hub's is the default repo.
    if empty := [dest for dest, value in vars(args).items() if value == "" and dest != "push_to_hub"]:
        raise ConverterError(f"{_flag(empty[0])} is empty: give it a value, or drop it")
    job = next((job for job in jobs if getattr(args, job) not in (None, False)), "convert")
    unused = [dest for dest in given if dest not in JOB_FLAGS[job].split()]
    if unused:
        flag, *more = map(_flag, unused)
        users = " or ".join(_flag(other) for other, dests in JOB_FLAGS.items() if unused[0] in dests.split())
        nor = f" (nor {', '.join(more)})" if more else ""
        raise ConverterError(f"{_flag(job)} does not use {flag}{nor}: drop it; {flag} goes with {users}")
    if "atol" in given:
        from converter.pipeline import check_atol

        check_atol(args.atol)
    if args.revision is not None and Path(args.audit or args.to_original).exists():
        raise ConverterError(
            f"--revision {escape(args.revision)} names a commit of a hub repo, but "
            f"{escape(args.audit or args.to_original)} is a local folder: drop --revision"
        )
    return jobs.get(job, _convert)(args)


def _flag(dest: str) -> str:
    """The flag of an argparse dest; the job without one, a conversion, by name."""
    return "a conversion" if dest == "convert" else "--" + dest.replace("_", "-")


def _list(args: argparse.Namespace) -> int:
    for v in VARIANTS.values():
        say(f"{v.name:45s} {v.arch.name:9s} {v.frames:3d} frames {v.image_size}px  {v.source.url()}")
    return EXIT_OK


def _show_config(args: argparse.Namespace) -> int:
    from converter.config import hyper_for_variant, to_config

    if not args.model_name:
        raise ConverterError("--show-config needs --model-name")
    say(to_config(hyper_for_variant(get_variant(args.model_name))).to_json_string(use_diff=False))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from converter.fetch import parse_sha256
    from converter.hub import push_target
    from converter.pipeline import convert_checkpoint, push

    if not args.checkpoint and not args.model_name:
        raise ConverterError("nothing to convert: give --checkpoint PATH or --model-name NAME (see --list)")
    if args.model_name:
        get_variant(args.model_name)
    if args.push_to_hub is not None and args.no_verify:
        raise ConverterError("--push-to-hub publishes only verified conversions: drop --no-verify")
    if (args.create_pr or args.private) and args.push_to_hub is None:
        raise ConverterError("--create-pr and --private go with --push-to-hub")
    if args.texts is not None and not args.video:
        raise ConverterError("--texts labels a clip: give the clip with --video PATH")
    parse_sha256(args.sha256)
    video, texts = (Path(args.video) if args.video else None), args.texts or list(DEFAULT_TEXTS)
    if video:  # the clip and the texts are checked before minutes of conversion, not after
        from converter.processing import encode_texts, load_video

        load_video(video, 1)  # reads a .npy's header and one frame, or opens a video's stream
        input_ids = encode_texts(texts)  # refuses an over-long text
    repo_id = None
    if args.push_to_hub is not None:  # checked, or looked up, before the work: fails fast offline
        repo_id = push_target(args.push_to_hub, args.model_name)
    elif args.output is None:
        logging.getLogger("converter").warning("no --output: nothing will be written")
    start_up = _seconds_since_process_start()
    result = convert_checkpoint(
        args.checkpoint,
        **_original(args),
        dtype=args.dtype,
        verify=not args.no_verify,
        force_download=args.force_download,
        output=args.output,
        overwrite=args.overwrite,
        repo_id=repo_id,
        hash_source=repo_id is not None,  # provenance on the hub
        protect=[("the --video clip", video)] if video else (),
    )
    if result.verification is not None:
        say(result.verification.summary())
    if result.written_vs_float32 is not None:
        figures = ", ".join(f"{k} {v:.2e}" for k, v in result.written_vs_float32.max_abs_diff.items())
        say(f"written {args.dtype} model vs the float32 original (reported, not gated): max |Δ| {figures}")
    if result.folder is not None:  # said first: the classification can still fail (a vocabulary not CLIP's)
        say(f"wrote {escape(str(result.folder))}")
    elif repo_id is None:
        say("no --output given: nothing written")
    if video:
        _classify(result, video, texts, input_ids)
    if repo_id is not None:
        say(f"pushed to {repo_id}: {push(result, repo_id, create_pr=args.create_pr, private=args.private)}")
    _log_times(start_up)
    return EXIT_OK


def _original(args: argparse.Namespace) -> dict[str, Any]:
    """How the flags name and check the original checkpoint, as convert_checkpoint and audit take it."""
    return {"model_name": args.model_name, "config": args.config, "sha256": args.sha256, "atol": args.atol}


def _classify(result: ConversionResult, video: Path, texts: list[str], input_ids: torch.Tensor) -> None:
    """Print each text's probability for the user's clip, from the converted model."""
    import torch

    from converter.build import build_model
    from converter.clip import VOCAB_SIZE
    from converter.processing import load_video, preprocess_video

    if result.hyper.vocab_size != VOCAB_SIZE:
        raise ConverterError(
            f"--video needs a model with CLIP's {VOCAB_SIZE}-token vocabulary to tokenize --texts; "
            f"this checkpoint's vocabulary has {result.hyper.vocab_size} tokens"
        )
    model = result.model or build_model(result.config, {k: v.float() for k, v in result.state_dict.items()})
    pixels = preprocess_video(load_video(video, result.hyper.frames), result.hyper.image_size)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels)
    for text, prob in zip(texts, out.logits_per_video.softmax(dim=1)[0].tolist(), strict=True):
        say(f"{prob:.4f}  {escape(text)}")


def _audit(args: argparse.Namespace) -> int:
    import tempfile
    from contextlib import nullcontext

    from converter import paths
    from converter.audit import audit, propose_fix
    from converter.export import staged_file
    from converter.hub import push_target
    from converter.pipeline import convert_checkpoint

    repo_id = None
    if args.create_pr and args.push_to_hub is None:
        raise ConverterError("with --audit, --create-pr goes with --push-to-hub: add it, or drop --create-pr")
    if args.push_to_hub is not None:  # a pull request to the audited repo, unless another is named
        if not args.create_pr:
            raise ConverterError("with --audit, --push-to-hub opens a pull request: add --create-pr")
        if not args.push_to_hub and Path(args.audit).exists():
            raise ConverterError(
                f"--audit {escape(args.audit)} is a folder: name the repo with --push-to-hub REPO_ID"
            )
        repo_id = push_target(args.push_to_hub or args.audit)
    # Staged before the audit: a --report that cannot be written is refused first.
    protected = paths.protected(
        checkpoint=args.checkpoint, config=args.config, source=args.audit, source_label="the audited folder"
    )
    staged = staged_file(args.report, True, protected, flag="--report") if args.report else nullcontext()
    with staged as report_file:
        report = audit(args.audit, checkpoint=args.checkpoint, **_original(args), revision=args.revision)
        if report_file is not None:
            report_file.write_text(report.to_json(), encoding="utf-8")
    say("\n".join(report.lines()))  # after the report is in place: a reader gone (`| head`) cuts only this
    if repo_id is not None and report.passed:  # said before minutes of conversion, not after
        say(f"no pull request opened: {escape(args.audit)} matches the original")
    elif repo_id is not None:
        with tempfile.TemporaryDirectory(prefix="xclip-fix-") as tmp:
            converted = Path(tmp) / "converted"
            result = convert_checkpoint(
                args.checkpoint, **_original(args), output=converted, repo_id=repo_id, hash_source=True
            )
            say(f"opened {propose_fix(report, result.folder, result.verification, repo_id)}")
    return report.exit_code


def _to_original(args: argparse.Namespace) -> int:
    from converter.to_original import to_original

    if not args.output:
        raise ConverterError("--to-original needs --output FILE.pth")
    start_up = _seconds_since_process_start()
    result = to_original(
        args.to_original, args.output, atol=args.atol, overwrite=args.overwrite, revision=args.revision
    )
    say(result.verification.summary())
    say(f"wrote {escape(str(result.output))}")
    _log_times(start_up)
    return EXIT_OK
