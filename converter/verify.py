"""Prove a conversion: the converted XCLIPModel against the independent original forward pass.

Inputs. A deterministic clip with structure across space and time: one scene of 16x16-pixel
blocks shared by all frames, a per-frame, per-channel offset, and pixel noise (roughly N(0, 1),
the scale of normalised images). I.i.d. noise pixels make every patch and every frame alike, so
the cross-frame message attention, the MIT and the prompt generator's cross-attention see nearly
identical tokens and a mistake there hardly moves the outputs; the shared scene and the per-frame
offsets give them real structure. Token ids: rows of different lengths, each ending with the end
token (the row maximum, where both models pool), as CLIP's tokenizer lays them out.

Sites compared. Every block of every stack, in forward order, where a mistake enters rather than
where it arrives diluted: the vision embeddings; per vision block the message token after
`message_fc`, after `message_ln`, the message attention's output, the token after its residual,
the self-attention's output and the block's output; the pooled vision features; per MIT and text
block its attention's output and its output; the text embeddings and the final text LayerNorm; per
prompt-generator layer its cross-attention's output and its output; and the eight outputs of
`ORACLE_KEYS` (the logits, the two normalised embeddings, the per-frame features before the MIT,
the MIT output, the patch features the prompt generator attends to, the raw text embeddings and the
prompts). The oracle yields its sites from its own code (`oracle.original_sites`); the HF side reads
them from XCLIPModel's outputs and forward hooks on its modules, never recomputed. Each site is
compared as it is computed and dropped, so verification holds one layer's activations, not all.
`Verification.first_divergence` names the first site in forward order over its tolerance: where the
mistake entered (a failing conversion points at the rule row).

Tolerance. Each site s passes when

    max |HF_s - original_s|  <=  atol * max |original_s|

i.e. `atol` (the CLI's `--atol`, default `DEFAULT_ATOL`) is the largest difference allowed
relative to the site's own magnitude. Sites differ in scale by orders of magnitude (logits ~10,
normalised embeddings ~0.05, prompts ~alpha, a message attention's output ~its biases), and float32
rounding follows each site's scale, so one absolute tolerance is either too loose for the small
sites or too tight for the large ones. `Verification.margin` is the largest ratio |Δ| / tolerance
over the sites: below 1 passes; a planted mistake fails by that factor
(benchmarks/verification_power.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter.clip import HEAD_DIM
from converter.config import Hyper
from converter.errors import VerificationError
from converter.oracle import (
    CROSS_ATTENTION,
    MESSAGE_ATTENTION,
    MESSAGE_FC,
    MESSAGE_LN,
    MESSAGE_TOKEN,
    MIT,
    PROMPT,
    SELF_ATTENTION,
    TEXT,
    TEXT_EMBEDDINGS,
    VISION,
    VISION_EMBEDDINGS,
    OriginalHeads,
    layer_site,
    original_sites,
)

if TYPE_CHECKING:
    from transformers import XCLIPModel

# Relative to each site's largest magnitude, chosen between two measurements: the ORIGINAL code's
# outputs on the goldens differ from the converted model's by <= 3e-7 relative (the headroom test in
# tests/test_verify.py; at full size the oracle and XCLIPModel agree bit for bit at every site), and
# the subtlest planted mistake at full size exceeds it 33x (q/k halves of layer 1's message attention
# bias on B/16 32f; benchmarks/verification_power.py, docs/verification.md).
DEFAULT_ATOL = 2e-5
NUM_TEXTS = 3
BLOCK = 16  # pixels per side of the scene's blocks
# Amplitudes of scene, per-frame offset and noise: variances sum to ~1, like normalised images.
SCENE, OFFSET, NOISE = 0.8, 0.5, 0.3

# The outputs, by their name here -> the oracle's. The first three are the ones stored in
# tests/data/synthetic.
ORACLE_KEYS = {
    "logits": "logits",
    "video_embeds": "video_embeds_normalized",
    "text_embeds": "text_embeds_normalized",
    "prompts": "prompts",
    "text_embeds_raw": "text_embeds_raw",
    "cls_features": "cls_features",
    "mit_output": "mit_last_hidden_state",
    "img_features": "img_features",
}
# What the oracle yields and verification does not compare: each is a site it compares, or a plain
# function of one (no weight of its own between them).
NOT_COMPARED = {
    "vision_last_hidden_state",  # the last vision block's output
    "video_embeds",  # the MIT output's mean, compared normalised
    "text_pooled",  # the final text LayerNorm at the end token, compared projected (text_embeds_raw)
    "text_embeds",  # text_embeds_raw + prompts, compared normalised
    "logit_scale_exp",  # a weight, compared in the logits
}


def _ratio(diff: float, tolerance: float) -> float:
    return diff / tolerance if tolerance > 0 else (math.inf if diff > 0 else 0.0)


@dataclass(frozen=True)
class Site:
    """One compared site: its name, max |Δ| and tolerance."""

    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ratio(self) -> float:
        """|Δ| / tolerance: the site passes when it is <= 1."""
        return _ratio(self.max_abs_diff, self.tolerance)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class Verification:
    """Max |Δ| between the converted model and the original and its tolerance, per output, and every
    compared site in forward order (`sites`, the outputs among them; empty when only outputs were
    compared)."""

    max_abs_diff: dict[str, float]
    tolerances: dict[str, float]
    atol: float
    sites: tuple[Site, ...] = ()

    @property
    def compared(self) -> tuple[Site, ...]:
        """Every compared site in forward order (the outputs alone when `sites` is empty)."""
        if self.sites:
            return self.sites
        return tuple(Site(name, diff, self.tolerances[name]) for name, diff in self.max_abs_diff.items())

    @property
    def ratios(self) -> dict[str, float]:
        """|Δ| / tolerance per output."""
        return {name: _ratio(diff, self.tolerances[name]) for name, diff in self.max_abs_diff.items()}

    @property
    def margin(self) -> float:
        """The largest ratio over the compared sites: how many times over its tolerance the worst is."""
        return max((site.ratio for site in self.compared), default=0.0)

    @property
    def worst(self) -> str:
        return max(self.compared, key=lambda site: site.ratio).name

    @property
    def passed(self) -> bool:
        return all(site.passed for site in self.compared)

    @property
    def first_divergence(self) -> Site | None:
        """The first site in forward order over its tolerance: where a mistake enters."""
        return next((site for site in self.compared if not site.passed), None)

    def divergence(self) -> str:
        """'first divergence: <site> at <ratio>x its tolerance', or '' when every site passed."""
        first = self.first_divergence
        return "" if first is None else f"first divergence: {first.name} at {first.ratio:.3g}x its tolerance"

    def summary(self) -> str:
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.max_abs_diff.items())
        verdict = "OK" if self.passed else "FAILED"
        worst = (
            f"worst {self.worst} at {self.margin:.3g}x its tolerance"
            if self.margin
            else "every site identical"
        )
        first = f", {divergence}" if (divergence := self.divergence()) else ""
        return (
            f"verification {verdict}: {worst}{first} ({len(self.compared)} sites compared, atol "
            f"{self.atol:g} x each site's max |value|); max |Δ| {diffs}"
        )


def synthetic_inputs(
    hyper: Hyper, videos: int = 1, texts: int = NUM_TEXTS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded structured clip [videos, T, 3, S, S] and token ids [texts, L] (see the module docstring).

    Row r of the ids: start token, 4 * 2**r ids, end token (the row maximum), then zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    size, frames = hyper.image_size, hyper.frames
    grid = -(-size // BLOCK)
    scene = torch.randn(videos, 1, 3, grid, grid, generator=gen)
    scene = scene.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :size, :size]
    offset = torch.randn(videos, frames, 3, 1, 1, generator=gen)
    noise = torch.randn(videos, frames, 3, size, size, generator=gen)
    pixel_values = SCENE * scene + OFFSET * offset + NOISE * noise

    input_ids = torch.zeros(texts, hyper.context_length, dtype=torch.long)
    sot, eot = hyper.vocab_size - 2, hyper.vocab_size - 1
    for row in range(texts):
        n = min(4 * 2**row, hyper.context_length - 2)
        input_ids[row, 0] = sot
        input_ids[row, 1 : n + 1] = torch.randint(1, hyper.vocab_size - 2, (n,), generator=gen)
        input_ids[row, n + 1] = eot
    return pixel_values, input_ids


OnSite = Callable[[str, torch.Tensor], None]


@torch.no_grad()
def read_sites(
    model: XCLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor, on_site: OnSite
) -> None:
    """Run XCLIPModel's own forward once and hand each site to `on_site(name, tensor)` as it is
    computed, in the oracle's forward order: read by forward hooks on the modules that compute them
    (and the model's outputs), never recomputed. Names: the oracle's, the outputs under `ORACLE_KEYS`."""
    videos, frames = pixel_values.shape[:2]
    vision, text, prompts = model.vision_model, model.text_model, model.prompts_generator

    def output(name: str, take: Callable = lambda out: out) -> Callable:
        return lambda module, args, out: on_site(name, take(out))

    def first(out: tuple) -> torch.Tensor:  # XCLIPAttention returns (output, weights)
        return out[0]

    def blocks(stack: str, layers: torch.nn.ModuleList) -> list[tuple[torch.nn.Module, Callable]]:
        """A CLIP block's attention output, then its output."""
        return [
            hook
            for i, layer in enumerate(layers)
            for hook in (
                (layer.self_attn, output(layer_site(stack, i, SELF_ATTENTION), first)),
                (layer, output(layer_site(stack, i))),
            )
        ]

    after: list[tuple[torch.nn.Module, Callable]] = [(vision.pre_layernorm, output(VISION_EMBEDDINGS))]
    before: list[tuple[torch.nn.Module, Callable]] = []
    for i, layer in enumerate(vision.encoder.layers):
        after += [
            (layer.message_fc, output(layer_site(VISION, i, MESSAGE_FC))),
            (layer.message_ln, output(layer_site(VISION, i, MESSAGE_LN))),
            (layer.message_attn, output(layer_site(VISION, i, MESSAGE_ATTENTION), first)),
            (layer.self_attn, output(layer_site(VISION, i, SELF_ATTENTION), first)),
            (layer, output(layer_site(VISION, i))),
        ]
        # The message token after its attention's residual is the last token layer_norm1 receives.
        token = layer_site(VISION, i, MESSAGE_TOKEN)
        before.append((layer.layer_norm1, lambda module, args, name=token: on_site(name, args[0][:, -1])))
    after += [
        (vision.post_layernorm, output("vision_pooled")),
        (model.visual_projection, output("cls_features", lambda out: out.view(videos, frames, -1))),
        *blocks(MIT, model.mit.encoder.layers),
        (model.mit, output("mit_output", lambda out: out.last_hidden_state)),
        (text.embeddings, output(TEXT_EMBEDDINGS)),
        *blocks(TEXT, text.encoder.layers),
        (text.final_layer_norm, output("text_last_hidden_state")),
        (model.text_projection, output("text_embeds_raw")),
    ]
    for i, layer in enumerate(prompts.decoder):
        after += [
            (layer.cross_attn, output(layer_site(PROMPT, i, CROSS_ATTENTION))),
            (layer, output(layer_site(PROMPT, i))),
        ]
    after.append((prompts, output("prompts")))
    # forward(text, visual): the patch features before the prompt generator's own LayerNorm.
    before.append((prompts, lambda module, args: on_site("img_features", args[1])))
    handles = [module.register_forward_hook(hook) for module, hook in after]
    handles += [module.register_forward_pre_hook(hook) for module, hook in before]
    try:
        out = model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    on_site("video_embeds", out.video_embeds)
    on_site("text_embeds", out.text_embeds)
    on_site("logits", out.logits_per_video)


def hf_outputs(
    model: XCLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """XCLIPModel's outputs under the names of `ORACLE_KEYS` (the other sites are not kept)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        if name in ORACLE_KEYS:
            captured[name] = tensor

    read_sites(model, pixel_values, input_ids, keep)
    return {name: captured[name] for name in ORACLE_KEYS}


def oracle_outputs(
    original_state_dict: Mapping[str, torch.Tensor],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    heads: OriginalHeads | None = None,
) -> dict[str, torch.Tensor]:
    """The oracle's outputs under the names of `ORACLE_KEYS` (the other sites are not kept)."""
    wanted = set(ORACLE_KEYS.values())
    out = {
        key: t
        for key, t in original_sites(original_state_dict, pixel_values, input_ids, heads)
        if key in wanted
    }
    return {name: out[key] for name, key in ORACLE_KEYS.items()}


def tolerance(expected: torch.Tensor, atol: float) -> float:
    """The module's rule: `atol` times the site's largest magnitude."""
    low, high = torch.aminmax(expected.float())  # no |x| copy of a whole layer's activations
    return atol * max(high.item(), -low.item())


def _site(name: str, expected: torch.Tensor, actual: torch.Tensor, atol: float) -> Site:
    if actual.shape != expected.shape:
        raise VerificationError(
            f"{name}: shape {list(actual.shape)} vs the original's {list(expected.shape)}"
        )
    diff = (actual.float() - expected.float()).abs_().max().item()
    return Site(name, diff, tolerance(expected, atol))


def compare(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], atol: float
) -> Verification:
    """Compare every output in `expected` (extra outputs in `actual` are ignored)."""
    sites = [_site(name, want, actual[name], atol) for name, want in expected.items()]
    return Verification({s.name: s.max_abs_diff for s in sites}, {s.name: s.tolerance for s in sites}, atol)


def compare_sites(
    model: XCLIPModel,
    expected: Iterable[tuple[str, torch.Tensor]],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    atol: float,
) -> Verification:
    """Compare every site of XCLIPModel's forward with the oracle's (`expected`: (name, tensor) in
    forward order, as `oracle.original_sites` yields them), each as soon as the model computes it.

    `expected` is advanced one site per HF site, so a generator runs in step with the model and only
    the current sites are alive. A site one side computes and the other does not (a different number
    of layers) is a VerificationError naming it."""
    oracle = iter(expected)
    sites: list[Site] = []

    def check(name: str, actual: torch.Tensor) -> None:
        key = ORACLE_KEYS.get(name, name)
        found = next(((k, t) for k, t in oracle if k not in NOT_COMPARED), None)
        if found is None or found[0] != key:
            where = "nothing more" if found is None else found[0]
            raise VerificationError(
                f"the converted model computes {name} where the original computes {where}"
            )
        sites.append(_site(name, found[1], actual, atol))

    read_sites(model, pixel_values, input_ids, check)
    left = next((k for k, _ in oracle if k not in NOT_COMPARED), None)
    if left is not None:
        raise VerificationError(f"the original computes {left}, which the converted model never computes")
    outputs = {site.name: site for site in sites if site.name in ORACLE_KEYS}
    return Verification(
        {name: outputs[name].max_abs_diff for name in ORACLE_KEYS},
        {name: outputs[name].tolerance for name in ORACLE_KEYS},
        atol,
        tuple(sites),
    )


def verify(
    model: XCLIPModel,
    original_state_dict: Mapping[str, torch.Tensor],
    hyper: Hyper,
    atol: float = DEFAULT_ATOL,
    heads: OriginalHeads | None = None,
) -> Verification:
    """Run both implementations on the same deterministic inputs and compare them at every site.

    `heads` defaults to the original's own rule (width // 64), NOT the config's head counts, so a
    config with wrong heads is caught rather than reproduced by the oracle.
    """
    pixel_values, input_ids = synthetic_inputs(hyper)
    oracle = original_sites(original_state_dict, pixel_values, input_ids, heads)
    return compare_sites(model, oracle, pixel_values, input_ids, atol)


def oracle_heads(hyper: Hyper) -> OriginalHeads | None:
    """Head counts for the oracle. None: the original's own rule (width // 64, hard-coded in its code),
    NOT the config's, so a config with wrong heads is caught rather than reproduced. Only below width
    64 (small test models built with explicit heads) does the config decide."""
    if min(hyper.vision_width, hyper.text_width, hyper.embed_dim) >= HEAD_DIM:
        return None
    return OriginalHeads(hyper.vision_heads, hyper.text_heads, hyper.mit_heads, hyper.prompt_heads)
