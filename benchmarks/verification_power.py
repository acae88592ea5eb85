"""The power of verification at full size: by how much each planted mistake fails it, and where.

For every distinct architecture among the 18 published variants (patch, width, frames, image size)
it makes a seeded full-size synthetic original checkpoint, runs the oracle ONCE on the verification
inputs (keeping its sites), then for every mistake of the catalogue (tests/mutations.py) converts
with the mistake planted in the rule table or the config, builds the model and compares it with the
oracle at every site, as `converter.verify.verify` does. A mistake's margin is the verification's
`margin`: the largest |Δ| / tolerance over the sites (> 1 fails). Its first site is the first one
in forward order over its tolerance; it must be the catalogue's (where the mistake was planted, or
the first site that consumes it). Mistakes the layout check (keys and shapes against the config)
stops before verification are reported as "layout".

Cost: a mistake that leaves the vision embeddings and vision blocks 0 .. k-1 as in the correct
conversion (the same weights, the same config) computes the same activations there, bit for bit:
its forward resumes at block k from the correct model's input to it, and the sites it skips count
with the correct model's figures. Every other mistake runs the whole forward.

Usage:
  nice -n 10 python benchmarks/verification_power.py [--variants NAME ...] [--mistakes TEXT ...]
      [--atol A] [--min-margin 10] [--json FILE [--resume]] [--docs docs/verification.md]

Prints one row per (architecture, mistake): its margin, the worst site, the first divergent site and
its ratio; exits 1 naming every mistake whose margin is below --min-margin or whose first site is not
the catalogue's, and when the correct conversion or a harmless twin does not pass. --docs rewrites
the table between the markers `<!-- verification_power -->` and `<!-- /verification_power -->` of
that file (mistakes as rows, architectures as columns). --json is rewritten after each variant;
with --resume, the variants already in it are kept rather than measured again (a run cut short
goes on where it stopped).
"""

# The catalogue of mistakes lives in tests/: the repository goes on sys.path before the imports.
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import argparse
import dataclasses
import json
import re
import tempfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from docs_block import rewrite

from converter.config import Hyper, hyper_for_variant
from converter.errors import ConverterError
from converter.oracle import VISION, layer_site, original_sites
from converter.registry import VARIANTS
from converter.rules import original_to_hf
from converter.synthetic import make_state_dict
from converter.verify import DEFAULT_ATOL, Verification, compare_sites, synthetic_inputs
from tests.mutations import HARMLESS, harmless, mistakes, plant

CORRECT = "(none: the correct conversion)"
HARMLESS_TAG = "harmless, must pass: "
VISION_FIELDS = (
    "image_size",
    "patch_size",
    "frames",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "vision_mlp",
)


@dataclass
class Row:
    architecture: str
    variant: str
    mistake: str
    expected: str  # the catalogue's first site; "layout" for the layout check; "" where nothing may fail
    margin: float | None  # None: caught by the layout check
    worst: str
    first: str | None  # the first divergent site (None: every site passed, or the layout check)
    first_ratio: float | None
    seconds: float

    @property
    def must_pass(self) -> bool:
        return self.mistake == CORRECT or self.mistake.startswith(HARMLESS_TAG)


def architectures() -> dict[str, str]:
    """One variant per distinct (patch, width, frames, image size), named like 'B/32 8f 224'."""
    found: dict[str, str] = {}
    for name, variant in VARIANTS.items():
        a = variant.arch
        key = f"{a.name.removeprefix('ViT-')} {variant.frames}f {variant.image_size}"
        found.setdefault(key, name)
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def first_changed_block(model, reference, hyper: Hyper, planted: Hyper) -> int:
    """The first vision block whose weights differ from the correct model's; 0 when the embeddings or
    the vision config differ, the number of blocks when the whole vision encoder is the same."""
    if any(getattr(hyper, f) != getattr(planted, f) for f in VISION_FIELDS):
        return 0
    theirs = dict(reference.vision_model.named_parameters())
    blocks = []
    for key, tensor in model.vision_model.named_parameters():
        if not _same(tensor, theirs[key]):
            block = re.match(r"encoder\.layers\.(\d+)\.", key)
            after_encoder = key.startswith("post_layernorm.")
            blocks.append(int(block[1]) if block else hyper.vision_layers if after_encoder else 0)
    return min(blocks, default=hyper.vision_layers)


def _skipped(name: str, start: int) -> bool:
    """A site of vision blocks 0 .. start-1."""
    return any(name.startswith(layer_site(VISION, i, "")) for i in range(start))


def resumed(
    model,
    start: int,
    inputs: dict[int, torch.Tensor],
    expected: list,
    correct: Verification,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    atol: float,
) -> Verification:
    """Verify `model`, its vision encoder resuming at block `start` from the correct model's input to
    it (`inputs[start]`; the encoder's output when start is the number of blocks); the sites of the
    blocks before it are the correct model's."""
    if start == 0:
        return compare_sites(model, expected, pixel_values, input_ids, atol)
    from transformers.modeling_outputs import BaseModelOutput

    encoder = model.vision_model.encoder

    def resume(inputs_embeds, attention_mask=None, **kwargs):
        hidden = inputs[start]
        for layer in encoder.layers[start:]:
            hidden = layer(hidden, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden)

    encoder.forward = resume
    wanted = [(name, tensor) for name, tensor in expected if not _skipped(name, start)]
    result = compare_sites(model, wanted, pixel_values, input_ids, atol)
    embeddings, *rest = result.sites  # the embeddings still run: they precede block 0
    reused = tuple(site for site in correct.sites if _skipped(site.name, start))
    return dataclasses.replace(result, sites=(embeddings, *reused, *rest))


def spilled(sites: Iterable[tuple[str, torch.Tensor]], folder: Path) -> list[tuple[str, torch.Tensor]]:
    """The oracle's sites, each written to `folder` and read back memory-mapped: kept for every
    mistake, they take page cache, which the machine can reclaim, instead of the process's memory
    (2 GB at L/14 16f 336)."""
    kept = []
    for number, (name, tensor) in enumerate(sites):
        path = folder / f"{number}.pt"
        torch.save(tensor.clone(memory_format=torch.contiguous_format), path)  # not a view's whole storage
        kept.append((name, torch.load(path, mmap=True, weights_only=True)))
    return kept


def measure(
    variant: str, spill: Path, atol: float = DEFAULT_ATOL, only: list[str] | None = None, log=print
) -> list[Row]:
    """Every planted mistake's margin and first site on a full-size synthetic checkpoint of `variant`;
    the oracle's sites are kept in files under `spill`."""
    from converter.build import build_model
    from converter.config import to_config

    hyper = hyper_for_variant(VARIANTS[variant])
    arch = next(k for k, v in architectures().items() if v == variant)
    original = make_state_dict(hyper, seed=zlib.crc32(variant.encode()))
    pixel_values, input_ids = synthetic_inputs(hyper)
    start = time.perf_counter()
    expected = spilled(original_sites(original, pixel_values, input_ids), spill)
    log(f"# {arch} ({variant}): oracle {time.perf_counter() - start:.1f} s, {len(expected)} sites")

    catalogue = [(m.name, m) for m in mistakes(hyper)]
    catalogue += [(HARMLESS_TAG + m.name, dataclasses.replace(m, site="")) for m in harmless(hyper)]
    catalogue = [(name, m) for name, m in catalogue if not only or any(s in name for s in only)]
    reference = build_model(to_config(hyper), original_to_hf(original))
    built = {}  # name -> (mistake, model or None when the layout check stops it, first changed block)
    for name, mistake in catalogue:
        try:
            model = plant(mistake, original, hyper)
        except ConverterError:
            built[name] = (mistake, None, 0)
        else:
            built[name] = (
                mistake,
                model,
                first_changed_block(model, reference, hyper, mistake.hyper or hyper),
            )

    # The correct model's run records the vision encoder's input to each block a mistake resumes at.
    layers = hyper.vision_layers
    inputs: dict[int, torch.Tensor] = {}
    starts = {s for _, model, s in built.values() if model is not None and 0 < s}
    handles = [
        reference.vision_model.encoder.layers[k].register_forward_pre_hook(
            lambda module, args, k=k: inputs.__setitem__(k, args[0])
        )
        for k in starts
        if k < layers
    ]
    handles.append(
        reference.vision_model.encoder.register_forward_hook(
            lambda module, args, out: inputs.__setitem__(layers, out.last_hidden_state)
        )
    )
    start = time.perf_counter()
    correct = compare_sites(reference, expected, pixel_values, input_ids, atol)
    for handle in handles:
        handle.remove()
    rows = {CORRECT: _row(arch, variant, CORRECT, "", correct, time.perf_counter() - start)}
    log(_format(rows[CORRECT]))

    # Those that resume later are cheaper: measure them first.
    for name in sorted(built, key=lambda n: -built[n][2]):
        mistake, model, first_block = built[name]
        start = time.perf_counter()
        if model is None:
            rows[name] = Row(arch, variant, name, mistake.site, None, "layout", None, None, 0.0)
        else:
            result = resumed(model, first_block, inputs, expected, correct, pixel_values, input_ids, atol)
            rows[name] = _row(arch, variant, name, mistake.site, result, time.perf_counter() - start)
        built[name] = None  # the model is no longer needed
        log(_format(rows[name]))
    return [rows[CORRECT], *(rows[name] for name, _ in catalogue)]


def _row(arch: str, variant: str, name: str, expected: str, result: Verification, seconds: float) -> Row:
    first = result.first_divergence
    name_ratio = (None, None) if first is None else (first.name, first.ratio)
    return Row(arch, variant, name, expected, result.margin, result.worst, *name_ratio, seconds)


def _format(row: Row) -> str:
    margin = "layout check" if row.margin is None else f"{row.margin:.3g}"
    first = "—" if row.first is None else f"{row.first} ({row.first_ratio:.3g})"
    return f"| {row.architecture} | {row.mistake} | {margin} | {row.worst} | {first} | {row.seconds:.1f} s |"


def failures(rows: list[Row], min_margin: float) -> list[str]:
    found = []
    for row in rows:
        where = f"{row.variant}: {row.mistake}"
        if row.must_pass:
            if row.margin is None or row.margin > 1:
                found.append(f"{where} does not pass verification ({row.margin})")
        elif (row.margin is None) != (row.expected == "layout"):
            found.append(f"{where}: {'stopped' if row.margin is None else 'not stopped'} by the layout check")
        elif row.margin is not None and row.margin < min_margin:
            found.append(f"{where}: margin {row.margin:.3g} < {min_margin:g}")
        elif row.margin is not None and row.first != row.expected:
            found.append(f"{where}: first divergence at {row.first}, expected {row.expected}")
    return found


def _sites(names: list[str]) -> str:
    """The first sites of one mistake across architectures, merged where only a layer number differs."""
    distinct = list(dict.fromkeys(names))
    parts = [re.fullmatch(r"(.* layer )(\d+)(,.*)", name) for name in distinct]
    if len(distinct) > 1 and all(parts) and len({(p[1], p[3]) for p in parts}) == 1:
        return f"{parts[0][1]}{' / '.join(p[2] for p in parts)}{parts[0][3]}"
    return " · ".join(distinct)


def pivot(rows: list[Row], atol: float) -> str:
    """Markdown: one row per mistake, one column per architecture, and the site each named first."""
    archs = list(dict.fromkeys(row.architecture for row in rows))
    by = {(row.mistake, row.architecture): row for row in rows}
    lines = [
        f"`--atol {atol:g}`; margin = max over sites of |Δ| / (atol × max |original site|); "
        f"in brackets the first divergent site's own ratio.",
        "",
        "| planted mistake | named first | " + " | ".join(archs) + " |",
        "|---|---|" + "---|" * len(archs),
    ]
    for mistake in dict.fromkeys(row.mistake for row in rows):
        cells = [by.get((mistake, arch)) for arch in archs]
        firsts = [c.first for c in cells if c is not None and c.first is not None]
        named = "—" if not firsts else _sites(firsts)
        if all(c is not None and c.margin is None for c in cells):
            named = "layout check"
        lines.append(f"| {mistake} | {named} | " + " | ".join(_cell(c) for c in cells) + " |")
    planted = [row for row in rows if not row.must_pass and row.first_ratio is not None]
    if planted:
        low = min(planted, key=lambda r: r.margin)
        lowest_first = min(planted, key=lambda r: r.first_ratio)
        lines += [
            "",
            f"Smallest margin: **{low.margin:.3g}**, {low.mistake} on {low.architecture} (worst site "
            f"{low.worst}); smallest ratio at a first divergent site: {lowest_first.first_ratio:.3g}, "
            f"{lowest_first.mistake} on {lowest_first.architecture} ({lowest_first.first}).",
        ]
    return "\n".join(lines)


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.margin is None:
        return "layout"
    if row.first is None:
        return f"{row.margin:.2g}"
    return f"{row.margin:.3g} ({row.first_ratio:.3g})"


def progress(line: str) -> None:
    """Progress goes to stderr; the tables go to stdout once every variant is measured."""
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help="default: one variant per distinct architecture")
    parser.add_argument("--mistakes", nargs="+", help="only mistakes whose name contains one of these")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    parser.add_argument("--min-margin", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the rows to this file (after each variant)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the variants already in --json, measure the rest",
    )
    parser.add_argument("--docs", type=Path, help="rewrite the power table between the markers in this file")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    if args.resume and not (args.json and args.json.is_file()):
        parser.error("--resume needs --json FILE from an earlier run")
    variants = args.variants or list(architectures().values())
    kept = [Row(**row) for row in json.loads(args.json.read_text())] if args.resume else []
    rows = [row for row in kept if row.variant in variants]
    for variant in variants:
        if any(row.variant == variant for row in rows):
            progress(f"# {variant}: kept from {args.json}")
            continue
        with tempfile.TemporaryDirectory(prefix="xclip-power-") as spill:
            rows += measure(variant, Path(spill), args.atol, args.mistakes, log=progress)
        if args.json:
            args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1) + "\n")
    rows.sort(key=lambda row: variants.index(row.variant))  # stable: each variant's rows keep their order
    print(f"atol {args.atol:g}; margin = max over sites of |Δ| / (atol x max |original site|)")
    print("| architecture | planted mistake | margin | worst site | first divergence (its ratio) | time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(_format(row))
    table = pivot(rows, args.atol)
    print(f"\n{table}")
    if args.docs:
        rewrite(args.docs, "verification_power", table)

    print("\nharmless twins (must pass):")
    for name, text in HARMLESS.items():
        print(f"- {name}: {text}")
    found = failures(rows, args.min_margin)
    for line in found:
        print(f"FAIL {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
