"""The library entry point: one checkpoint through fetch -> load -> map -> build -> verify -> export.

    result = convert_checkpoint("k400_32_8.pth", model_name="xclip-base-patch32", output="out")
    result.verification.passed, result.folder

A refusal is a `ConverterError` naming the file, key or value and what to do; a verification that runs
and fails is a `VerificationError` and writes nothing. The `converter` logger gets one line a stage.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter import DEFAULT_ATOL, DTYPES, fetch, paths
from converter.config import (
    Hyper,
    check_fits_weights,
    check_heads,
    check_variant,
    config_source,
    hyper_from_config,
    infer_hyper,
    load_config_file,
    loading_keys,
    to_config,
)
from converter.errors import ConverterError, VerificationError, escape, listed
from converter.export import identity, in_background, staged_output, weights_written_meanwhile, write_weights
from converter.load import check_finite, load_checkpoint, non_finite
from converter.reader import check_regular
from converter.registry import Variant, get_variant
from converter.rules import check_state_dict, original_shapes, original_to_hf

if TYPE_CHECKING:
    from transformers import XCLIPConfig, XCLIPModel

    from converter.verify import Verification

StateDict = dict[str, torch.Tensor]
log = logging.getLogger("converter")


@dataclass(frozen=True)
class Provenance:
    """Where the checkpoint came from, as the model card states it: a URL, or a local file's name
    (never an absolute local path, which would leak a user's folders when published)."""

    path: Path  # the local file that was converted
    origin: str  # URL, or the file name
    sha256: str | None
    config: str | Path | None = None  # the config file read with it, which no output may touch
    # The file as it was read (absolute path, device, inode, size, mtime): the weights are views of its
    # mapped bytes, which a program writing into that same file changes; one renamed over it does not.
    identity: tuple[str, int, int, int, int] | None = None

    def check_unchanged(self) -> None:
        """Refuse to write weights from a checkpoint written into since it was read (a trainer saving over
        it): what was verified may not be what is written, nor the digest the card states."""
        if self.identity is None or (now := _identity(self.identity[0])) is None:
            return  # gone, or a new file renamed into its place: the mapped one is as it was read
        if now[:3] == self.identity[:3] and now != self.identity:
            raise ConverterError(
                f"{escape(str(self.path))} changed while it was converted (another program wrote it?); "
                "nothing was written: convert a copy that stays as it is"
            )


@dataclass(frozen=True)
class ConversionResult:
    name: str
    hyper: Hyper
    config: XCLIPConfig
    state_dict: StateDict  # XCLIPModel keys, in the output dtype
    dtype: torch.dtype
    provenance: Provenance
    verification: Verification | None  # the mapping check (gated by atol); None with verify=False
    # With a reduced dtype: the written model against the float32 original (reported, not gated).
    written_vs_float32: Verification | None = None
    folder: Path | None = None  # where it was written, if it was
    model: XCLIPModel | None = field(default=None, repr=False, compare=False)  # the verified model


def convert_checkpoint(
    source: str | Path | None = None,
    *,
    model_name: str | None = None,
    config: XCLIPConfig | str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    verify: bool = True,
    atol: float | None = None,
    sha256: str | None = None,
    force_download: bool = False,
    output: str | Path | None = None,
    overwrite: bool = False,
    repo_id: str | None = None,
    hash_source: bool = False,
    protect: Iterable[tuple[str, str | Path]] = (),
) -> ConversionResult:
    """Convert a checkpoint file, URL or (`model_name` alone) release; `output` appears only when all passed.
    `repo_id`: the card's repo; `hash_source`: hash the file for it; `protect`: (label, path) not to touch."""
    atol = DEFAULT_ATOL if atol is None else check_atol(atol)
    out_dtype = _output_dtype(dtype)
    variant = get_variant(model_name) if model_name else None
    sha256 = fetch.parse_sha256(sha256)
    config_file = config if isinstance(config, str | Path) else None
    if config_file is not None:
        with stage("config", escape(str(config_file))):  # reading it imports transformers (about 1 s)
            config = load_config_file(config_file)
    protected = [*paths.protected(checkpoint=source, config=config_file), *((k, Path(p)) for k, p in protect)]

    with ExitStack() as writing:
        folder = None
        if output is not None:
            # Staged before any work: a folder that cannot be written is refused now, not after the
            # download; a failure below removes the staging, so nothing is left behind.
            folder = writing.enter_context(staged_output(output, overwrite, protected))
        with stage("fetch") as note:
            provenance = _fetch(source, variant, sha256, force_download)
            provenance = replace(provenance, identity=_identity(provenance.path))
            note(escape(str(provenance.path)))
        digest = in_background(_sha256, provenance, hash_source)
        with stage("load") as note:
            original = load_checkpoint(provenance.path, check_values=False)
            megabytes = sum(t.numel() * t.element_size() for t in original.values()) >> 20
            note(f"{len(original)} tensors, {megabytes} MB")
        with stage("map") as note:
            where = config_source(config_file)
            hyper, converted = map_original(original, config, variant, str(provenance.origin), where)
            state_dict = {k: v.to(out_dtype) for k, v in converted.items()}
            note(f"{len(state_dict)} tensors, {str(out_dtype).removeprefix('torch.')}")

        weights_written = None
        if folder is not None:
            # The weights are written while transformers is imported and the model verified.
            weights_written = writing.enter_context(weights_written_meanwhile(folder, state_dict))
        # A copy: the caller's config object is not changed. to_config imports transformers meanwhile.
        xclip_config = copy.deepcopy(config) if config is not None else to_config(hyper)
        if weights_written is not None and not verify:
            weights_written()
        # NaN/inf are refused before verification (where they would read as a mapping mistake), and
        # after the write started: a pass over the mmap'd checkpoint just before it slowed the write.
        check_finite(original, provenance.path)
        if out_dtype != torch.float32 and (overflowed := non_finite(state_dict)):  # float16 ends at 65504
            raise ConverterError(
                f"--dtype {str(out_dtype).removeprefix('torch.')} cannot hold every weight of "
                f"{escape(str(provenance.origin))}: "
                f"{', '.join(listed(overflowed, 5))} would be written as inf; use --dtype float32"
                + (" or bfloat16" if out_dtype == torch.float16 else "")
            )
        xclip_config.dtype = out_dtype  # recorded in config.json so from_pretrained restores it
        model = verification = written = None
        if verify:
            with stage("verify") as note:
                model, verification, written = _verify(
                    xclip_config, state_dict, original, hyper, out_dtype, atol
                )
                note(verification.summary().split(";")[0])  # the verdict; stdout gets every figure
            if not verification.passed:
                origin = escape(str(provenance.origin))
                raise VerificationError(
                    f"the converted model does not reproduce the original ({origin}); nothing was written",
                    verification,
                )
        provenance = replace(provenance, sha256=digest.result(), config=config_file)
        name = model_name or Path(provenance.origin).stem
        result = ConversionResult(
            name, hyper, xclip_config, state_dict, out_dtype, provenance, verification, written, model=model
        )
        if folder is None:
            return result
        with stage("write", escape(str(output))):
            write_small_files(result, folder, repo_id)
            if weights_written is not None:
                weights_written()
            provenance.check_unchanged()
    return replace(result, folder=Path(output))


def map_original(
    original: Mapping[str, torch.Tensor],
    config: XCLIPConfig | None,
    variant: Variant | None,
    source: str,
    where: str = "the config",
) -> tuple[Hyper, StateDict]:
    """An original state dict's hyper-parameters (`config`'s, else inferred) and its XCLIPModel weights;
    refused, naming `source` or `where`, when unlike `variant` or a head count, key, shape or size is off."""
    hyper = infer_hyper(original) if config is None else hyper_from_config(config)
    if variant is not None:
        check_variant(hyper, variant, escape(source))
    if config is None:
        check_heads(hyper)
    # Keys with no place in this config are listed with the missing and mis-shaped ones, in one message.
    expected = original_shapes(hyper)
    unknown = [f"{escape(k)} {list(t.shape)}" for k, t in original.items() if k not in expected]
    converted = original_to_hf({k: t for k, t in original.items() if k in expected})
    check_state_dict(converted, hyper, unmapped=unknown)
    if config is not None:
        check_fits_weights(config, converted, where)
    return hyper, converted


def write_folder(
    result: ConversionResult, folder: str | Path, *, overwrite: bool = False, repo_id: str | None = None
) -> ConversionResult:
    """Write a converted model's folder (weights, config, processor, card) atomically."""
    folder = Path(folder)
    read = paths.protected(checkpoint=result.provenance.path, config=result.provenance.config)
    with staged_output(folder, overwrite, read) as staging:
        write_weights(staging, result.state_dict)
        write_small_files(result, staging, repo_id)
        result.provenance.check_unchanged()
    return replace(result, folder=folder)


def push(result: ConversionResult, repo_id: str, *, create_pr: bool = False, private: bool = False) -> str:
    """Publish a verified conversion in one commit; return the commit or pull-request URL."""
    from converter.hub import push_folder

    if result.verification is None or not result.verification.passed:
        raise ConverterError("only verified conversions are published: convert with verification on")
    with tempfile.TemporaryDirectory(prefix="xclip-push-") as tmp:
        folder = result.folder or write_folder(result, Path(tmp) / result.name, repo_id=repo_id).folder
        return push_folder(folder, repo_id, create_pr=create_pr, private=private)


def write_small_files(result: ConversionResult, folder: Path, repo_id: str | None = None) -> None:
    """Everything but the weights: the processor files, the card, and a config.json naming XCLIPModel without
    LOADING_KEYS (of a --config copied from a quantized repo, say): the folder is the verified model."""
    from converter.card import model_card
    from converter.processor_files import write_processor

    config = result.config
    if dropped := loading_keys(config):
        log.warning(
            "config.json leaves out %s, which make from_pretrained load other than the verified weights",
            ", ".join(dropped),
        )
        for key in dropped:
            delattr(config, key)
    config.architectures = ["XCLIPModel"]
    config.save_pretrained(folder)
    write_processor(folder, result.hyper.image_size)
    written = result.written_vs_float32
    card = model_card(
        name=result.name,
        hyper=result.hyper,
        source=result.provenance.origin,
        sha256=result.provenance.sha256,
        verification=result.verification,
        repo_id=repo_id,
        dtype=str(result.dtype).removeprefix("torch."),
        float32_distance=written.max_abs_diff if written is not None else None,
    )
    (folder / "README.md").write_text(card, encoding="utf-8")


def _output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConverterError(f"dtype must be one of {', '.join(DTYPES)}, got {escape(str(dtype))}")
    return getattr(torch, name)


def check_atol(atol: float) -> float:
    if not (isinstance(atol, int | float) and 0 < atol < 1):  # 1: a site of zeros would pass
        raise ConverterError(
            f"--atol must be a finite number above 0 and below 1 (a fraction of each site's magnitude), "
            f"got {atol!r}"
        )
    return float(atol)


@contextmanager
def stage(name: str, *details: str) -> Iterator:
    """Log one line when a stage ends: its name, `details` and what it notes, and how long it took."""
    start = time.perf_counter()
    noted = [*details]
    yield noted.append
    log.info("%s: %s(%.1f s)", name, "".join(f"{d} " for d in noted), time.perf_counter() - start)


def _identity(path: str | Path) -> tuple[str, int, int, int, int] | None:
    """`export.identity` with the absolute path: the caller may change folders meanwhile."""
    found = identity(path := os.path.abspath(path))
    return None if found is None else (path, *found)


def _fetch(source: str | Path | None, variant: Variant | None, sha256: str | None, force: bool) -> Provenance:
    if source is None:
        if variant is None:
            raise ConverterError("nothing to convert: give a checkpoint (path or URL) or a model name")
        path = fetch.fetch_source(variant.source, sha256=sha256, force=force)
        return Provenance(path, variant.source.url(), sha256)
    text = str(source)
    if "://" in text:
        return Provenance(fetch.fetch_url(text, sha256=sha256, force=force), text, sha256)
    path = Path(source)
    check_regular(path, f"--checkpoint {escape(text)}")
    if sha256:
        fetch.fetch_url(path.resolve().as_uri(), sha256=sha256)  # checks the pin, never deletes
    return Provenance(path, path.name, sha256)


def _sha256(provenance: Provenance, hash_source: bool) -> str | None:
    """The checkpoint's sha256 for the card: the pin or the fetch record, or (when asked: publishing) the
    file hashed, which must agree with them; the pipeline runs this on a second core meanwhile."""
    known = (provenance.sha256 or "").lower() or fetch.recorded_sha256(provenance.path)
    if not hash_source:
        return known
    if known not in (None, actual := fetch.sha256_file(provenance.path)):  # a cached copy changed since
        raise ConverterError(
            f"{escape(str(provenance.path))} has sha256 {actual}, not the {known} it was fetched or pinned "
            "with: it changed since; fetch it again with --force-download"
        )
    return actual


def _verify(
    config: XCLIPConfig,
    state_dict: StateDict,
    original: Mapping[str, torch.Tensor],
    hyper: Hyper,
    dtype: torch.dtype,
    atol: float,
) -> tuple[XCLIPModel, Verification, Verification | None]:
    """The converted model against the oracle on the original weights, both rounded to the output dtype so
    only a mapping mistake fails; with a reduced dtype also against the float32 original (reported only)."""
    from converter.build import build_model
    from converter.verify import check_token_table, oracle_heads, verify

    model = build_model(config, {k: v.float() for k, v in state_dict.items()})
    heads = oracle_heads(hyper)
    rounded = {k: v.to(dtype).float() for k, v in original.items()}
    verification = verify(model, rounded, hyper, atol, heads)
    if verification.passed:
        check_token_table(model, rounded, atol)
    written = None
    if dtype != torch.float32 and verification.passed:
        written = verify(model, {k: v.float() for k, v in original.items()}, hyper, atol, heads)
    return model, verification, written
