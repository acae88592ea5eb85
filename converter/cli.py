"""`xclip-convert`: fetch -> load -> convert -> verify -> write, for one checkpoint.

Exit status: 0 converted (and verified), 1 verification failed, 2 bad input.
Heavy modules (torch, transformers) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from converter.errors import ConverterError, VerificationError
from converter.registry import VARIANTS, Variant, get_variant

if TYPE_CHECKING:
    from converter.convert import Conversion, StateDict

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TEXTS = ("playing sports", "eating spaghetti", "go shopping")
EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xclip-convert",
        description="Convert an original X-CLIP checkpoint to a transformers XCLIPModel folder and "
        "verify it against an independent implementation of the original forward pass.",
    )
    src = p.add_argument_group("source")
    src.add_argument("--checkpoint", metavar="PATH|URL", help="original checkpoint: a local file or URL")
    src.add_argument(
        "--model-name",
        "--model_name",
        dest="model_name",
        metavar="NAME",
        help="a published variant (see --list): fetched when --checkpoint is absent, and the "
        "checkpoint must match its registry config",
    )
    src.add_argument(
        "--config", metavar="FILE", help="XCLIPConfig JSON overriding inference from the checkpoint"
    )
    src.add_argument("--sha256", metavar="HEX", help="pin the checkpoint's sha256; a mismatch fails")
    src.add_argument(
        "--force-download", action="store_true", help="fetch again even if the cache holds the checkpoint"
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--output",
        "--pytorch_dump_folder_path",
        dest="output",
        metavar="DIR",
        help="folder to write (config.json, model.safetensors)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    out.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")

    out.add_argument(
        "--push-to-hub",
        "--push_to_hub",
        dest="push_to_hub",
        nargs="?",
        const="",
        default=None,
        metavar="REPO_ID",
        help="upload the verified folder (default repo: <your user>/<model name>)",
    )
    out.add_argument("--create-pr", action="store_true", help="with --push-to-hub: open a pull request")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    ver = p.add_argument_group("verification")
    ver.add_argument(
        "--no-verify", action="store_true", help="skip the comparison with the original forward pass"
    )
    ver.add_argument(
        "--atol", type=float, default=None, help="max |Δ| allowed on logits and embeddings (1e-4)"
    )

    ver.add_argument("--video", metavar="PATH", help="a clip (.npy frames or a video file) to classify")
    ver.add_argument(
        "--texts",
        nargs="+",
        metavar="TEXT",
        default=list(DEFAULT_TEXTS),
        help=f"labels for --video (default: {', '.join(DEFAULT_TEXTS)})",
    )

    info = p.add_argument_group("information")
    info.add_argument("--list", action="store_true", help="list the published variants and exit")
    info.add_argument("--show-config", action="store_true", help="print --model-name's XCLIPConfig and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            return _list_variants()
        if args.show_config:
            return _show_config(args)
        return _convert(args)
    except ConverterError as err:
        print(f"xclip-convert: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerificationError as err:
        print(f"xclip-convert: {err}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED


def _list_variants() -> int:
    for v in VARIANTS.values():
        where = v.source.ref if v.source.kind == "release" else f"gdrive:{v.source.ref}"
        print(f"{v.name:45s} {v.arch.name:9s} {v.frames:3d} frames {v.image_size}px  {where}")
    return EXIT_OK


def _show_config(args: argparse.Namespace) -> int:
    from converter.config import hyper_for_variant, to_config

    if not args.model_name:
        raise ConverterError("--show-config needs --model-name")
    print(to_config(hyper_for_variant(get_variant(args.model_name))).to_json_string(use_diff=False))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    if not args.checkpoint and not args.model_name:
        raise ConverterError("nothing to convert: give --checkpoint PATH or --model-name NAME (see --list)")
    if args.push_to_hub is not None and args.no_verify:
        raise ConverterError("--push-to-hub publishes only verified conversions: drop --no-verify")
    variant = get_variant(args.model_name) if args.model_name else None
    output = Path(args.output) if args.output else None
    if output is not None:
        from converter.export import check_output

        check_output(output, args.overwrite)  # refuse before spending minutes on the work
    repo_id = _repo_id(args) if args.push_to_hub is not None else None  # likewise: fail fast offline

    import torch

    from converter.config import load_config_file
    from converter.convert import convert
    from converter.load import load_checkpoint

    config = load_config_file(args.config) if args.config else None
    path, source = _resolve_checkpoint(args, variant)
    digest = _source_digest(path, args.sha256, publishing=args.push_to_hub is not None)
    original = load_checkpoint(path)
    result = convert(
        original, variant=variant, config=config, dtype=getattr(torch, args.dtype), source=str(path)
    )

    def write_small_files(folder: Path) -> None:
        from converter.card import model_card
        from converter.processor_files import write_processor

        result.config.save_pretrained(folder)
        write_processor(folder, result.hyper.image_size)
        card = model_card(
            name=args.model_name or path.stem,
            hyper=result.hyper,
            source=source,
            sha256=digest.result(),  # last: the hash runs while the weights are written
            verification=result.verification,
            repo_id=repo_id,
        )
        (folder / "README.md").write_text(card)

    with ExitStack() as writing:
        if output is not None:
            from converter.export import staged_output, weights_written_meanwhile

            # The weights are written while transformers is imported and the conversion verified;
            # a failure below removes the staged folder, so nothing is left behind.
            folder = writing.enter_context(staged_output(output, args.overwrite))
            writing.enter_context(weights_written_meanwhile(folder, result.state_dict))
        if not args.no_verify:
            _verify(args, result, original, path)
        if args.video:
            _classify(args, result)
        if output is not None:
            write_small_files(folder)
    if output is not None:
        print(f"wrote {output}")
    elif repo_id is None:
        print("no --output given: nothing written")
    if repo_id is not None:
        _push(args, repo_id, output, result.state_dict, write_small_files)
    return EXIT_OK


def _verify(args: argparse.Namespace, result: Conversion, original: StateDict, path: Path) -> None:
    from converter.convert import verify_conversion
    from converter.verify import DEFAULT_ATOL

    verification = verify_conversion(result, original, DEFAULT_ATOL if args.atol is None else args.atol)
    print(verification.summary())
    if not verification.passed:
        raise VerificationError(
            f"the converted model does not reproduce the original ({path}); nothing was written"
        )


def _resolve_checkpoint(args: argparse.Namespace, variant: Variant | None) -> tuple[Path, str]:
    """The local path of the checkpoint, and where it came from (for the model card)."""
    from converter import fetch

    checkpoint = args.checkpoint
    if checkpoint and "://" in checkpoint:
        return fetch.fetch_url(checkpoint, sha256=args.sha256, force=args.force_download), checkpoint
    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise ConverterError(f"--checkpoint {path}: no such file")
        if args.sha256:
            fetch.fetch_url(path.resolve().as_uri(), sha256=args.sha256)  # checks the pin, never deletes
        return path, str(path)
    assert variant is not None
    path = fetch.fetch_source(variant.source, sha256=args.sha256, force=args.force_download)
    return path, fetch.source_url(variant.source)


def _source_digest(path: Path, pinned: str | None, publishing: bool) -> Future[str | None]:
    """The checkpoint's sha256 for the model card, without a second read of the file where possible:
    the verified pin, or the digest recorded when it was fetched. A plain local file is hashed only
    for publishing (provenance on the hub), on a second core while the conversion runs."""
    from converter.fetch import recorded_sha256, sha256_file

    known = (pinned or "").lower() or recorded_sha256(path)
    if known or not publishing:
        done: Future[str | None] = Future()
        done.set_result(known)
        return done
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256").submit(sha256_file, path)


def _classify(args: argparse.Namespace, result: Conversion) -> None:
    """Print each text's probability for the user's clip, from the converted model."""
    import torch

    from converter.build import build_model
    from converter.processing import CLIP_VOCAB_SIZE, encode_texts, load_video, preprocess_video

    if result.hyper.vocab_size != CLIP_VOCAB_SIZE:
        raise ConverterError(
            f"--video needs a model with CLIP's {CLIP_VOCAB_SIZE}-token vocabulary to tokenize --texts; "
            f"this checkpoint's vocabulary has {result.hyper.vocab_size} tokens"
        )
    model = result.model or build_model(result.config, {k: v.float() for k, v in result.state_dict.items()})
    frames = load_video(args.video, result.hyper.frames)
    with torch.no_grad():
        out = model(
            input_ids=encode_texts(args.texts), pixel_values=preprocess_video(frames, result.hyper.image_size)
        )
    for text, prob in zip(args.texts, out.logits_per_video.softmax(dim=1)[0].tolist(), strict=True):
        print(f"{prob:.4f}  {text}")


def _repo_id(args: argparse.Namespace) -> str:
    from converter.hub import default_repo_id

    return args.push_to_hub or default_repo_id(args.model_name)


def _push(
    args: argparse.Namespace,
    repo_id: str,
    output: Path | None,
    state_dict: StateDict,
    write_small_files: Callable[[Path], None],
) -> None:
    import tempfile

    from converter.export import write_weights
    from converter.hub import push_folder

    if output is None:
        with tempfile.TemporaryDirectory(prefix="xclip-push-") as folder:
            write_weights(Path(folder), state_dict)
            write_small_files(Path(folder))
            url = push_folder(Path(folder), repo_id, create_pr=args.create_pr, private=args.private)
    else:
        url = push_folder(output, repo_id, create_pr=args.create_pr, private=args.private)
    print(f"pushed to {repo_id}: {url}")


if __name__ == "__main__":
    sys.exit(main())
