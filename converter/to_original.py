"""The way back: a transformers X-CLIP (folder or hub repo id) to the original checkpoint layout,
`{'model': state_dict}` in the original's key order, by the rule table (`rules.hf_to_original`). The oracle
on the written file, read back weights-only, must reproduce the HF model before it is renamed into place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from converter import DEFAULT_ATOL, paths, rules
from converter.config import Hyper, check_fits_weights, heads_off_rule, hyper_from_config
from converter.errors import ConverterError, VerificationError, escape
from converter.export import staged_file, torch_save
from converter.load import check_finite, check_kinds, load_checkpoint
from converter.pipeline import check_atol, stage
from converter.published import load_published
from converter.rules import check_state_dict, original_shapes
from converter.verify import Verification, check_token_table, oracle_heads, verify

# Names of files that are not torch checkpoints: a pickle under them is read by nothing that opens them.
OTHER_FORMATS = (".safetensors", ".json", ".npy", ".npz", ".onnx", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class BackConversion:
    output: Path
    tensors: int
    verification: Verification


def to_original(
    source: str | Path,
    output: str | Path,
    *,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
    revision: str | None = None,
) -> BackConversion:
    """Convert `source` back to an original checkpoint at `output`, verified. Raises ConverterError on bad
    input, VerificationError when the oracle on the written file disagrees; either way nothing is written."""
    from converter.build import build_model

    atol = check_atol(atol)
    if (suffix := Path(output).suffix.lower()) in OTHER_FORMATS:
        raise ConverterError(
            f"--output {escape(str(output))}: the way back writes a torch checkpoint (the original's "
            f"format), not a {escape(suffix)} file: name it FILE.pth"
        )
    # Staged before any work (a hub id's snapshot is in the Hugging Face cache, protected too).
    with staged_file(output, overwrite, paths.protected(source=source)) as partial:
        with stage("load") as note:
            published = load_published(source, revision=revision)
            hyper = hyper_from_config(published.config)
            weights = published.model_state_dict()
            # Refused by the published key before anything is written (read back, they would be named
            # by the written file's keys).
            where = f"{escape(str(source))}: {published.weights_name}"
            check_kinds(weights, where)
            check_finite(weights, where, advice="convert or download the model again")
            note(f"{escape(str(source))}, {len(weights)} tensors")
        with stage("map") as note:
            # Every key, every shape, against the published config.
            check_state_dict(weights, hyper, f"{where} vs config.json")
            check_fits_weights(published.config, weights, f"{escape(str(source))}: config.json")
            back = rules.hf_to_original(weights)
            # In the order the original trainer saved them: what a reader of the original file expects.
            original = {k: _compact(back[k]) for k in original_shapes(hyper)}
            note(f"{len(original)} tensors in the original layout")
        with stage("write") as note:
            torch_save({"model": original}, partial)
            note(escape(str(output)))
        with stage("verify") as note:
            # Its values are the source's, checked in the load stage: read back without a second pass.
            written = {k: v.float() for k, v in load_checkpoint(partial, check_values=False).items()}
            model = build_model(published.config, {k: v.float() for k, v in weights.items()})
            try:
                verification = verify(model, written, hyper, atol, oracle_heads(hyper))
                if verification.passed:
                    check_token_table(model, written, atol)
            except (RuntimeError, ValueError) as err:  # e.g. width 129, which width // 64 = 2 does not divide
                why = f"the original forward pass cannot run on the written weights: {err}"
                raise VerificationError(why) from None
            note(verification.summary().split(";")[0])
        if not verification.passed:
            raise VerificationError(
                f"the original forward pass on the converted-back weights does not reproduce {source} "
                f"({verification.summary()}){_heads_hint(hyper)}; nothing was written"
            )
    return BackConversion(Path(output), len(original), verification)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes: torch.save writes whole storages, so a view (a transpose,
    or a slice of a memory-mapped file) would otherwise carry its base into the file."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.contiguous().clone()


def _heads_hint(hyper: Hyper) -> str:
    """Name the usual cause: head counts other than the original's width // 64 (the old port's 8)."""
    if oracle_heads(hyper) is not None:  # widths below 64: the config's heads are the original's
        return ""
    wrong = [f"{path} {stated} ≠ {rule}" for path, stated, rule in heads_off_rule(hyper)]
    return f". The config's heads differ from the original's width // 64: {', '.join(wrong)}" if wrong else ""
