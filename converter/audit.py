"""Audit a published transformers X-CLIP model against the original checkpoint it claims to be: its
config, weights, outputs (against the oracle), preprocessing and tokenizer, each a list of findings;
and the pull request that fixes what the audit found. The published folder is only read."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import reduce
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from converter import DEFAULT_ATOL, DEFAULT_TEXTS
from converter.card import data_template, recorded_source
from converter.clip import CONTEXT_LENGTH, HEAD_DIM
from converter.config import Hyper, config_source, load_config_file, loading_keys, to_config
from converter.errors import ConverterError, reason
from converter.load import load_checkpoint
from converter.pipeline import _fetch, map_original
from converter.processing import build_tokenizer, normalize, preprocess_video
from converter.processing import original_settings as original_preprocessing
from converter.published import Published, load_published
from converter.registry import get_variant
from converter.verify import Site, Verification, config_heads, verify

if TYPE_CHECKING:
    from transformers import XCLIPConfig

EXIT_MATCH, EXIT_MISMATCH = 0, 1
KINDS = ("config", "weights", "outputs", "preprocessing", "tokenizer")
LINES_PER_KIND = 12  # lines() shortens long lists (e.g. every tensor of a transposed family); JSON has all
# What the tokenizer must reproduce: case, punctuation, digits, accents, whitespace, contractions, "".
SENTENCES = (
    *DEFAULT_TEXTS,
    "a video of a person playing the violin.",
    "Someone is DANCING in the rain!!",
    "two dogs  running\tacross a field",
    "cutting 3 tomatoes & 2 onions",
    "it's a man's world, isn't it?",
    "café au lait, naïve résumé",
    "",
)
PREPROCESSING_SLACK = 1e-6  # float rounding between two runs of the same processor settings
VIDEOMAE = "VideoMAEImageProcessor"  # X-CLIP's image processor class; each transformers names a variant


@dataclass(frozen=True)
class Finding:
    """One compared item: published value against the original's, and whether it matters."""

    kind: str  # one of KINDS
    name: str
    published: Any
    original: Any
    ok: bool
    changes_computation: bool | None = None  # None: not applicable (a summary line)
    detail: str = ""
    severity: float = 0.0  # orders findings of one kind: larger is worse

    def describe(self) -> str:
        text = self.detail or f"{self.name} {_show(self.published)} ≠ {_show(self.original)}"
        if not self.ok and self.changes_computation:  # a failing finding always does; notes pass
            text += " (changes the computation)"
        return text


@dataclass
class AuditReport:
    source: str
    original: str  # what the published model was compared with
    atol: float
    findings: list[Finding] = field(default_factory=list)
    revision: str | None = None  # hub commit audited

    @property
    def passed(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def exit_code(self) -> int:
        return EXIT_MATCH if self.passed else EXIT_MISMATCH

    def ordered(self) -> list[Finding]:
        """Worst first: failures (each changes the computation), then by check (cause before effect)."""
        return sorted(self.findings, key=lambda f: (f.ok, KINDS.index(f.kind), -f.severity))

    def summary(self) -> str:
        """One line: the verdict and the worst finding."""
        failures = [f for f in self.ordered() if not f.ok]
        where = f"{self.source}{f'@{self.revision[:10]}' if self.revision else ''} vs {self.original}"
        if not failures:
            return f"audit {where}: MATCH (every check within tolerance)"
        kinds = ", ".join(sorted({f.kind for f in failures}, key=KINDS.index))
        worst = f"{failures[0].kind}: {failures[0].describe()}"
        return f"audit {where}: MISMATCH, {len(failures)} findings ({kinds}); worst: {worst}"

    def lines(self) -> list[str]:
        out, shown = [self.summary()], Counter()
        for f in self.ordered():
            shown[f.kind] += 1
            if shown[f.kind] <= LINES_PER_KIND:
                out.append(f"  {'ok  ' if f.ok else 'FAIL'} {f.kind:13s} {f.describe()}")
        more = [(kind, n - LINES_PER_KIND) for kind, n in shown.items() if n > LINES_PER_KIND]
        return out + [f"  …  {kind:13s} {n} more (all in the JSON report)" for kind, n in more]

    def to_json(self) -> str:
        findings = [asdict(f) for f in self.ordered()]
        data = {"summary": self.summary(), "passed": self.passed, **asdict(self), "findings": findings}
        # JSON has no inf or nan: read back with them as null. Other types are written as their str.
        data = json.loads(json.dumps(data, default=str), parse_constant=lambda _: None)
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _show(value: Any) -> str:
    if isinstance(value, dict):  # a processor's size, {"height": 224, "width": 224}: its sides
        value = list(value.values())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def audit(
    source: str | Path | Published,
    *,
    model_name: str | None = None,
    checkpoint: str | Path | None = None,
    config: XCLIPConfig | str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    revision: str | None = None,
    reference: str | Path | None = None,
    sha256: str | None = None,
) -> AuditReport:
    """Compare `source` (a folder, hub repo id or loaded model) with `checkpoint`, else `model_name`'s
    release; `config` states what widths below 64 cannot, `reference` is an `.npz` of frames and the
    original's preprocessing of them. `source` is read first, so a bad one fails before a download."""
    variant = get_variant(model_name) if model_name else None
    if checkpoint is None and variant is None:
        raise ConverterError("--audit needs --model-name or --checkpoint: the original to compare against")
    published = source if isinstance(source, Published) else load_published(source, revision=revision)
    provenance = _fetch(checkpoint, variant, sha256, False)  # found or downloaded as a conversion does
    original = load_checkpoint(provenance.path)
    where = config_source(config)
    if isinstance(config, (str, Path)):
        config = load_config_file(config)
    hyper, ours = map_original(original, config, variant, str(provenance.path), where)
    given = hyper if config is not None else None  # what a given config says, heads included
    findings = [
        *config_findings(published, config if config is not None else to_config(hyper), given),
        *weight_findings(published, ours),
        *output_findings(published, original, hyper, atol, config is not None),
        *preprocessing_findings(published.image_processor, hyper.image_size, reference),
        *tokenizer_findings(published),
    ]
    origin = recorded_source(provenance.origin, variant)[0]  # as a card may show it: no credentials
    described = f"{variant.name} ({origin})" if variant else origin
    return AuditReport(published.source, described, atol, findings, published.revision)


def config_findings(source: Published, expected: XCLIPConfig, given: Hyper | None = None) -> list[Finding]:
    """Each differing field that changes the computation; training-only ones (dropout, init) as notes;
    keys that load other than the weights stored, and a dtype other than theirs (it rounds them); the
    heads a --config gives (`given`) where a width above 64 leaves the original no choice."""
    from converter.config import ACTIVATIONS, EPSILONS, FIELDS, FINITE, PROBABILITIES, heads_off_rule

    published = source.config
    computation = [*ACTIVATIONS, *EPSILONS, "vision_config.num_channels"]
    computation += [path for f in FIELDS for path in f.config_paths]
    findings = []
    for names, changes in ((computation, True), ((*PROBABILITIES, *FINITE), False)):
        for name in sorted(names):
            got, want = (reduce(getattr, name.split("."), config) for config in (published, expected))
            if got != want:
                note = "" if changes else f"{name} {got} vs {want}: training only"
                findings.append(Finding("config", name, got, want, not changes, changes, note))
    for key in loading_keys(published):
        detail = f"{key} in config.json: from_pretrained would not load the published weights as they are"
        findings.append(Finding("config", key, getattr(published, key), None, False, True, detail))
    if published.dtype not in (None, source.weights_dtype):  # from_pretrained loads them as it says
        stated, stored = (str(d).removeprefix("torch.") for d in (published.dtype, source.weights_dtype))
        detail = f"dtype {stated} in config.json, but the weights are {stored}: "
        detail += f"from_pretrained loads them as {stated}"
        findings.append(Finding("config", "dtype", stated, stored, False, True, detail))
    # The original computes width // 64 heads: a config saying otherwise (the published model's own wrong
    # count, say) would have the oracle compute the same mistake. A width of 64 or less: a small test
    # model, whose config states its heads (as verification then takes them).
    real = given is not None and min(given.vision_width, given.text_width, given.embed_dim) > HEAD_DIM
    for path, stated, rule in heads_off_rule(given) if real else ():
        detail = f"--config states {path} {stated}; the original computes width // 64 = {rule}"
        findings.append(Finding("config", path, stated, rule, False, True, detail))
    if all(f.ok for f in findings):
        findings.append(Finding("config", "all", None, None, True, detail="every field that matters agrees"))
    return findings


def weight_findings(published: Published, ours: Mapping[str, torch.Tensor]) -> list[Finding]:
    """Each published tensor against `ours`, our conversion of the original, in the published dtype."""
    theirs = published.model_state_dict()
    findings, identical = [], 0
    for key in sorted(ours.keys() | theirs.keys()):
        got, want = theirs.get(key), ours.get(key)
        if got is None or want is None or got.shape != want.shape:  # missing, unexpected or mis-shaped
            shapes = [list(t.shape) if t is not None else "absent" for t in (got, want)]
            findings.append(Finding("weights", key, *shapes, False, True, severity=math.inf))
        elif torch.equal(got, want := want.to(got.dtype)):
            identical += 1
        else:
            diff = (got.float() - want.float()).abs().max().item()
            detail = f"{key}: max |Δ| {diff:.3g}"
            findings.append(Finding("weights", key, None, None, False, True, detail, diff))
    dtypes = "/".join(sorted({str(v.dtype).removeprefix("torch.") for v in theirs.values()}))
    summary = f"{identical} of {len(ours)} tensors identical to our conversion of the original ({dtypes})"
    if buffers := len(published.state_dict) - len(theirs):
        summary += f"; {buffers} position_ids buffers stored by an older transformers, ignored"
    ok = identical == len(ours)
    return [*findings, Finding("weights", "identical", identical, len(ours), ok, detail=summary)]


def output_findings(
    published: Published,
    original: Mapping[str, torch.Tensor],
    hyper: Hyper,
    atol: float,
    heads_from_config: bool,
) -> list[Finding]:
    """The published model against the oracle on the original weights: all sites in one finding, then
    each output. A given config states the original's heads; otherwise its rule, width // 64, does."""
    from converter.build import build_model

    # The oracle sees the original rounded as the published weights are, so only real mistakes remain.
    rounded = {k: v.to(published.weights_dtype).float() for k, v in original.items()}
    try:  # a third party's model: whatever stops it (a key or shape the weights check names) is a finding
        model = build_model(published.config, {k: v.float() for k, v in published.model_state_dict().items()})
        result = verify(model, rounded, hyper, atol, config_heads(hyper) if heads_from_config else None)
    except Exception as err:
        detail = f"the published model cannot load its weights or run the original's inputs ({reason(err)})"
        return [Finding("outputs", "run", None, None, False, True, detail, math.inf)]
    count, first = len(result.compared), result.first_divergence
    worst = f"worst {result.worst} at {result.margin:.3g}×" if result.margin else "all agree exactly"
    if first is None:
        detail = f"all {count} sites within tolerance (every block of every stack); {worst}"
        findings = [Finding("outputs", "every site", count, count, True, True, detail, result.margin)]
    else:  # as severe as the worst site: listed first among the outputs, where it names the cause
        where = f"{first.name} at {first.ratio:.3g}× its tolerance"
        detail = f"first divergence: {where} (of {count} sites compared in forward order; {worst})"
        diff, tol = first.max_abs_diff, first.tolerance
        findings = [Finding("outputs", "first divergence", diff, tol, False, True, detail, result.margin)]
    for name, diff in result.max_abs_diff.items():
        tol, ratio = result.tolerances[name], result.ratios[name]
        detail = f"{name}: max |Δ| {diff:.2e} vs the oracle, {ratio:.3g}× its tolerance {tol:.1e}"
        findings.append(
            Finding("outputs", name, diff, tol, Site(name, diff, tol).passed, True, detail, ratio)
        )
    return findings


def preprocessing_findings(
    raw: Mapping[str, Any] | None, image_size: int, reference: str | Path | None = None
) -> list[Finding]:
    """The published processor's settings, as transformers reads them, against the original's; its output."""
    from transformers import VideoMAEImageProcessorPil

    if raw is None:
        detail = "no image processor files"
        return [Finding("preprocessing", "files", "absent", "present", False, True, detail)]
    settings = original_preprocessing(image_size)
    frames, targets, what = _reference_frames(image_size, reference)

    def pixels(processor: Any) -> list[np.ndarray]:  # [3, S, S], each frame alone: their shapes differ
        prepared = [processor([f], return_tensors="np", input_data_format="channels_last") for f in frames]
        return [p["pixel_values"][0, 0] for p in prepared]

    def distance(outputs: list[np.ndarray]) -> float:
        return max(float(np.abs(o - t).max()) for o, t in zip(outputs, targets, strict=True))

    given = {k: v for k, v in raw.items() if k in settings and v is not None}  # null: the default
    try:
        published = VideoMAEImageProcessorPil(**given)
        outputs = pixels(published)
    except Exception as err:
        detail = f"the published image processor fails on a frame ({reason(err)})"
        return [Finding("preprocessing", "measured", None, None, False, True, detail, math.inf)]
    expected = VideoMAEImageProcessorPil(**settings)
    got, want, findings = published.to_dict(), expected.to_dict(), []
    # The class AutoImageProcessor builds: another one (CLIP's, say) prepares frames as separate images.
    if (kind := raw.get("image_processor_type")) is not None and not str(kind).startswith(VIDEOMAE):
        findings.append(Finding("preprocessing", "processor_type", kind, VIDEOMAE, False, True, severity=1.0))
    for name in settings:
        if not _close(got[name], want[name]):
            short = name.removeprefix("image_").removesuffix("_size")  # as a reader says them: crop, mean
            # Severity 1: a setting is the cause, so it comes before the measured effect (severity 0).
            findings.append(Finding("preprocessing", short, got[name], want[name], False, True, severity=1.0))
    if any(o.shape != t.shape for o, t in zip(outputs, targets, strict=True)):
        shapes = " / ".join(sorted({str(list(o.shape)) for o in outputs}))
        want_shape = list(targets[0].shape)
        detail = f"output shape {shapes} ≠ {want_shape} on {what}"
        return [*findings, Finding("preprocessing", "output shape", shapes, want_shape, False, True, detail)]
    # Transformers cannot match the original bit for bit: the floor is what the correct settings achieve.
    diff, floor = distance(outputs), distance(pixels(expected))
    detail = f"max |Δ| {diff:.3g} from the original on {what} (correctly configured: {floor:.3g})"
    ok = diff <= floor + PREPROCESSING_SLACK
    return [*findings, Finding("preprocessing", "measured", diff, floor, ok, True, detail)]


def _close(a: Any, b: Any) -> bool:
    """Equal; numbers up to float rounding (a mean stored as 0.48500001)."""
    return a == b if isinstance(a, dict) else bool(np.allclose(a, b, rtol=1e-4, atol=1e-6))


def _reference_frames(
    size: int, reference: str | Path | None
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Frames and the original's output: `reference`'s when it covers `size`, else seeded frames'."""
    if reference is not None and Path(reference).is_file():
        data = np.load(reference, allow_pickle=False)
        names = [k.removeprefix("frame/") for k in data.files if k.startswith("frame/")]
        if names and all(f"original{size}/{n}" in data.files for n in names):
            originals = torch.from_numpy(np.stack([data[f"original{size}/{n}"] for n in names]))
            targets = list(normalize(originals.permute(0, 3, 1, 2).float()).numpy())
            return [data[f"frame/{n}"] for n in names], targets, f"{len(names)} reference frames"
    # Three shapes: 4:3, portrait 9:16, and small 4:3 that needs upscaling.
    rng, frames = np.random.default_rng(0), []
    for h, w in ((240, 320), (320, 180), (96, 128)):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
        frames.append(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))
    targets = [preprocess_video(f[None], size)[0, 0].numpy() for f in frames]
    return frames, targets, f"{len(frames)} generated frames (against converter.processing)"


def tokenizer_findings(published: Published) -> list[Finding]:
    """Ids of SENTENCES, padded to 77, against CLIP's tokenizer. Only differences up to the end token
    matter: the text tower is causal and pools there (the original itself pads with 0)."""

    def ids(tokenizer: Any, sentence: str) -> list[int]:
        return list(tokenizer(sentence, padding="max_length", max_length=CONTEXT_LENGTH)["input_ids"])

    try:
        tokenizer = published.load_tokenizer()
    except ConverterError as err:
        return [Finding("tokenizer", "load", None, None, False, True, str(err), math.inf)]
    reference, findings, same = build_tokenizer(), [], 0
    for sentence in SENTENCES:
        want = ids(reference, sentence)
        try:
            got = ids(tokenizer, sentence)
        except Exception as err:
            detail = f"{sentence!r}: {reason(err)}"
            findings.append(Finding("tokenizer", sentence, None, want, False, True, detail))
            continue
        if got == want:
            same += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip_longest(got, want)) if a != b)
        end = want.index(reference.eos_token_id)  # SENTENCES are short: CLIP ends each
        content = first <= end
        where = "padding only, after the end token"
        if content:
            where = "at the end token" if first == end else "before the end token"
        detail = f"{sentence!r}: ids differ from position {first} ({where}), the next four: "
        detail += f"{_show(got[first : first + 4])} ≠ {_show(want[first : first + 4])}"
        findings.append(
            Finding("tokenizer", sentence, got, want, not content, content, detail, len(want) - first)
        )
    padding = sum(f.ok for f in findings)
    detail = f"{same} of {len(SENTENCES)} sentences tokenized exactly as CLIP's tokenizer does"
    detail += f", {padding} differ in the padding only" if padding else ""
    ok = padding == len(findings)
    return [*findings, Finding("tokenizer", "identical", same, len(SENTENCES), ok, detail=detail)]


def fix_card(report: AuditReport, card: str, repo_id: str | None = None) -> str:
    """The folder's model card with data/fix_card.md's section on what this pull request fixes; it names
    the audited repo (`repo_id`) and the original as a card may: no local path, no credentials."""
    failures = [f for f in report.ordered() if not f.ok]
    repo_id = repo_id or report.source
    section = data_template("fix_card.md").substitute(
        repo_id=repo_id,
        audited="this repository" if report.source == repo_id else "a local copy of this repository",
        commit=f"(commit {report.revision}) " if report.revision else "",
        original=report.original,
        count=len(failures),
        rows="\n".join(f"| {f.kind} | {f.describe()} |" for f in failures),
    )
    if card.startswith("---\n") and (end := card.find("\n---\n", 4)) != -1:
        return f"{card[: end + 5]}\n{section}\n{card[end + 5 :].lstrip()}"
    return f"{section}\n{card}"


def propose_fix(
    report: AuditReport, folder: str | Path, verification: Verification | None, repo_id: str
) -> str:
    """Open a pull request on `repo_id` with our verified `folder`, its card listing the findings; its URL."""
    from converter.hub import push_folder

    folder = Path(folder)
    if verification is None or not verification.passed:
        raise ConverterError(
            "refusing to open a pull request: our conversion was not verified against the original "
            "(drop --no-verify, or fix the failing verification first)"
        )
    if report.passed:
        raise ConverterError(f"{report.source} matches the original: the audit found nothing to fix")
    if not (folder / "config.json").is_file():
        raise ConverterError(f"{folder}: not a converted model folder (no config.json)")
    with tempfile.TemporaryDirectory(prefix="xclip-fix-") as staging:
        staged = Path(staging) / folder.name
        shutil.copytree(folder, staged)  # the folder itself stays as it is
        card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
        (staged / "README.md").write_text(fix_card(report, card, repo_id))
        return push_folder(staged, repo_id, create_pr=True)
