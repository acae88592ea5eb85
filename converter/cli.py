"""`xclip-convert`: fetch -> load -> convert -> verify -> write, for one checkpoint.

Exit status: 0 converted (and verified), 1 verification failed, 2 bad input.
Heavy modules (torch, transformers) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from converter.errors import ConverterError, VerificationError
from converter.registry import VARIANTS, get_variant

DTYPES = ("float32", "float16", "bfloat16")
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

    ver = p.add_argument_group("verification")
    ver.add_argument(
        "--no-verify", action="store_true", help="skip the comparison with the original forward pass"
    )
    ver.add_argument(
        "--atol", type=float, default=None, help="max |Δ| allowed on logits and embeddings (1e-4)"
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
    variant = get_variant(args.model_name) if args.model_name else None
    output = Path(args.output) if args.output else None
    if output is not None:
        from converter.export import check_output

        check_output(output, args.overwrite)  # refuse before spending minutes on the work

    import torch

    from converter.config import load_config_file
    from converter.convert import convert
    from converter.load import load_checkpoint
    from converter.verify import DEFAULT_ATOL

    config = load_config_file(args.config) if args.config else None
    path = _resolve_checkpoint(args, variant)
    original = load_checkpoint(path)
    result = convert(
        original,
        variant=variant,
        config=config,
        dtype=getattr(torch, args.dtype),
        run_verification=not args.no_verify,
        atol=DEFAULT_ATOL if args.atol is None else args.atol,
        source=str(path),
    )
    if result.verification is not None:
        print(result.verification.summary())
        if not result.verification.passed:
            raise VerificationError(
                f"the converted model does not reproduce the original ({path}); nothing was written"
            )
    if output is None:
        print("no --output given: nothing written")
        return EXIT_OK

    from converter.export import write_atomically, write_model_files

    write_atomically(
        output, args.overwrite, lambda folder: write_model_files(folder, result.config, result.state_dict)
    )
    print(f"wrote {output}")
    return EXIT_OK


def _resolve_checkpoint(args: argparse.Namespace, variant: object) -> Path:
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.exists():
            raise ConverterError(f"--checkpoint {path}: no such file")
        return path
    raise ConverterError("fetching by --model-name is not available yet; pass --checkpoint PATH")


if __name__ == "__main__":
    sys.exit(main())
