"""Prove a conversion: the converted XCLIPModel against the oracle, site by site in forward order.

Inputs are a seeded clip with structure across space and time (i.i.d. noise would hide mistakes in the
message attention, MIT and prompt generator). A site passes when max |HF - original| <= atol * max
|original|, since float32 rounding follows each site's scale."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import TYPE_CHECKING

import torch

from converter import DEFAULT_ATOL, oracle
from converter.clip import HEAD_DIM
from converter.config import Hyper
from converter.errors import VerificationError
from converter.oracle import OriginalHeads, layer_site, original_sites

if TYPE_CHECKING:
    from transformers import XCLIPModel

Tensor = torch.Tensor

NUM_TEXTS = 3
BLOCK = 16  # pixels per side of the scene's blocks
# Amplitudes of scene, per-frame offset and noise: variances sum to ~1, like normalised images.
SCENE, OFFSET, NOISE = 0.8, 0.5, 0.3

# The outputs, by their name here -> the oracle's. The first three are stored in tests/data/synthetic.
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
# What the oracle yields and verification does not compare: each is a compared site or a function of
# one with no weight of its own in between.
NOT_COMPARED = {
    "vision_last_hidden_state",  # the last vision block's output
    "video_embeds",  # the MIT output's mean, compared normalised
    "text_pooled",  # the final text LayerNorm at the end token, compared projected (text_embeds_raw)
    "text_embeds",  # text_embeds_raw + prompts, compared normalised
    "logit_scale_exp",  # a weight, compared in the logits
}


@dataclass(frozen=True)
class Site:
    """One compared site: its name, max |Δ| and tolerance."""

    name: str
    max_abs_diff: float
    tolerance: float

    @classmethod
    def measure(cls, name: str, expected: Tensor, actual: Tensor, atol: float) -> Site:
        """max |Δ| at one site and its tolerance: `atol` times the site's largest magnitude."""
        if actual.shape != expected.shape:
            raise VerificationError(
                f"{name}: shape {list(actual.shape)} vs the original's {list(expected.shape)}"
            )
        low, high = torch.aminmax(expected.float())  # no |x| copy of a whole layer's activations
        diff = (actual.float() - expected.float()).abs_().max().item()
        return cls(name, diff, atol * max(high.item(), -low.item()))

    @property
    def passed(self) -> bool:
        """|Δ| within the tolerance, both finite: a NaN (inf - inf, an overflow) fails, never passes."""
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance < math.inf

    @property
    def ratio(self) -> float:
        """|Δ| / tolerance: at most 1 where the site passes, inf where a value is not finite."""
        if not (math.isfinite(self.max_abs_diff) and math.isfinite(self.tolerance)):
            return math.inf
        if self.tolerance > 0:
            return self.max_abs_diff / self.tolerance
        return math.inf if self.max_abs_diff > 0 else 0.0


@dataclass(frozen=True)
class Verification:
    """Max |Δ| and tolerance per output, and every compared site in forward order (`sites`)."""

    max_abs_diff: dict[str, float]
    tolerances: dict[str, float]
    atol: float
    sites: tuple[Site, ...] = ()

    @classmethod
    def of(cls, outputs: Iterable[Site], atol: float, sites: tuple[Site, ...] = ()) -> Verification:
        outputs = list(outputs)
        return cls(
            {s.name: s.max_abs_diff for s in outputs}, {s.name: s.tolerance for s in outputs}, atol, sites
        )

    @property
    def compared(self) -> tuple[Site, ...]:
        """Every compared site in forward order (the outputs alone when `sites` is empty)."""
        return self.sites or tuple(Site(n, diff, self.tolerances[n]) for n, diff in self.max_abs_diff.items())

    @property
    def ratios(self) -> dict[str, float]:
        return {n: Site(n, diff, self.tolerances[n]).ratio for n, diff in self.max_abs_diff.items()}

    @property
    def margin(self) -> float:
        """How many times over its tolerance the worst compared site is."""
        return max((site.ratio for site in self.compared), default=0.0)

    @property
    def worst(self) -> str:
        return max(self.compared, key=lambda site: site.ratio).name

    @property
    def first_divergence(self) -> Site | None:
        """The first site in forward order over its tolerance: where a mistake enters."""
        return next((site for site in self.compared if not site.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_divergence is None

    def divergence(self) -> str:
        """'first divergence: <site> at <ratio>x its tolerance', or '' when every site passed."""
        first = self.first_divergence
        return "" if first is None else f"first divergence: {first.name} at {first.ratio:.3g}x its tolerance"

    def summary(self) -> str:
        worst = "every site identical"
        if self.margin:
            worst = f"worst {self.worst} at {self.margin:.3g}x its tolerance"
        first = f", {self.divergence()}" if self.first_divergence else ""
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.max_abs_diff.items())
        return (
            f"verification {'OK' if self.passed else 'FAILED'}: {worst}{first} ({len(self.compared)} sites "
            f"compared, atol {self.atol:g} x each site's max |value|); max |Δ| {diffs}"
        )


def synthetic_inputs(hyper: Hyper, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded clip [1, T, 3, S, S] (a scene of 16x16 blocks, a per-frame offset, noise) and ids
    [NUM_TEXTS, L]: row r is the start token, 4 * 2**r ids, the end token (the row maximum), zeros."""
    gen = torch.Generator().manual_seed(seed)
    size, frames = hyper.image_size, hyper.frames
    grid = -(-size // BLOCK)
    scene = torch.randn(1, 1, 3, grid, grid, generator=gen)
    scene = scene.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :size, :size]
    offset = torch.randn(1, frames, 3, 1, 1, generator=gen)
    noise = torch.randn(1, frames, 3, size, size, generator=gen)
    pixel_values = SCENE * scene + OFFSET * offset + NOISE * noise

    input_ids = torch.zeros(NUM_TEXTS, hyper.context_length, dtype=torch.long)
    sot, eot = hyper.vocab_size - 2, hyper.vocab_size - 1
    for row in range(NUM_TEXTS):
        n = min(4 * 2**row, hyper.context_length - 2)
        input_ids[row, 0] = sot
        input_ids[row, 1 : n + 1] = torch.randint(1, hyper.vocab_size - 2, (n,), generator=gen)
        input_ids[row, n + 1] = eot
    return pixel_values, input_ids


OnSite = Callable[[str, Tensor], None]


@torch.no_grad()
def read_sites(model: XCLIPModel, pixel_values: Tensor, input_ids: Tensor, on_site: OnSite) -> None:
    """Run XCLIPModel's forward once, handing each site to `on_site(name, tensor)` in the oracle's order
    and names (`ORACLE_KEYS` for the outputs), read by hooks, never recomputed."""
    videos, frames = pixel_values.shape[:2]
    vision, text, prompts = model.vision_model, model.text_model, model.prompts_generator
    handles = []

    def after(module: torch.nn.Module, name: str, take: Callable = lambda out: out) -> None:
        handles.append(module.register_forward_hook(lambda _, args, out: on_site(name, take(out))))

    def before(module: torch.nn.Module, name: str, take: Callable) -> None:
        handles.append(module.register_forward_pre_hook(lambda _, args: on_site(name, take(args))))

    first = itemgetter(0)  # XCLIPAttention returns (output, weights)
    try:
        after(vision.pre_layernorm, oracle.VISION_EMBEDDINGS)
        for i, layer in enumerate(vision.encoder.layers):
            site = partial(layer_site, oracle.VISION, i)
            after(layer.message_fc, site(oracle.MESSAGE_FC))
            after(layer.message_ln, site(oracle.MESSAGE_LN))
            after(layer.message_attn, site(oracle.MESSAGE_ATTENTION), first)
            # The message token after its attention's residual is the last token layer_norm1 receives.
            before(layer.layer_norm1, site(oracle.MESSAGE_TOKEN), lambda args: args[0][:, -1])
            after(layer.self_attn, site(oracle.SELF_ATTENTION), first)
            after(layer, site(oracle.OUTPUT))
        after(vision.post_layernorm, "vision_pooled")
        after(model.visual_projection, "cls_features", lambda out: out.view(videos, frames, -1))
        for stack, layers in ((oracle.MIT, model.mit.encoder.layers), (oracle.TEXT, text.encoder.layers)):
            for i, layer in enumerate(layers):
                after(layer.self_attn, layer_site(stack, i, oracle.SELF_ATTENTION), first)
                after(layer, layer_site(stack, i))
        after(model.mit, "mit_output", lambda out: out.last_hidden_state)
        after(text.embeddings, oracle.TEXT_EMBEDDINGS)
        after(text.final_layer_norm, "text_last_hidden_state")
        after(model.text_projection, "text_embeds_raw")
        # forward(text, visual): the patch features before the prompt generator's own LayerNorm.
        before(prompts, "img_features", lambda args: args[1])
        for i, layer in enumerate(prompts.decoder):
            after(layer.cross_attn, layer_site(oracle.PROMPT, i, oracle.CROSS_ATTENTION))
            after(layer, layer_site(oracle.PROMPT, i))
        after(prompts, "prompts")
        out = model(input_ids=input_ids, pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    on_site("video_embeds", out.video_embeds)
    on_site("text_embeds", out.text_embeds)
    on_site("logits", out.logits_per_video)


def compare_sites(
    model: XCLIPModel,
    expected: Iterable[tuple[str, Tensor]],
    pixel_values: Tensor,
    input_ids: Tensor,
    atol: float,
) -> Verification:
    """Compare every site of XCLIPModel's forward with the oracle's `expected`, advanced in step so only
    the current sites are alive; a site only one side computes is a VerificationError naming it."""
    theirs = ((key, tensor) for key, tensor in expected if key not in NOT_COMPARED)
    sites: list[Site] = []

    def check(name: str, actual: Tensor) -> None:
        key, tensor = next(theirs, ("nothing more", None))
        if key != ORACLE_KEYS.get(name, name):
            raise VerificationError(f"the converted model computes {name} where the original computes {key}")
        sites.append(Site.measure(name, tensor, actual, atol))

    read_sites(model, pixel_values, input_ids, check)
    if (left := next(theirs, None)) is not None:
        raise VerificationError(f"the original computes {left[0]}, which the converted model never computes")
    outputs = {site.name: site for site in sites if site.name in ORACLE_KEYS}
    return Verification.of((outputs[name] for name in ORACLE_KEYS), atol, tuple(sites))


def verify(
    model: XCLIPModel,
    original_state_dict: Mapping[str, Tensor],
    hyper: Hyper,
    atol: float = DEFAULT_ATOL,
    heads: OriginalHeads | None = None,
) -> Verification:
    """Run both implementations on the same deterministic inputs and compare them at every site."""
    pixel_values, input_ids = synthetic_inputs(hyper)
    expected = original_sites(original_state_dict, pixel_values, input_ids, heads)
    return compare_sites(model, expected, pixel_values, input_ids, atol)


def check_token_table(model: XCLIPModel, original: Mapping[str, Tensor], atol: float) -> None:
    """The inputs look up a few dozen of the vocabulary's ids, so the sites cannot see the other rows of
    the token table: each row is compared here, as a lookup of its id returns it."""
    table, theirs = model.text_model.embeddings.token_embedding.weight, original["token_embedding.weight"]
    if theirs.shape == table.shape and torch.equal(theirs.to(table.dtype), table):  # no copy: the usual case
        return
    site = Site.measure("token embeddings", theirs, table, atol)
    if not site.passed:
        rows = int((theirs.to(table.dtype) != table).any(dim=1).sum())
        raise VerificationError(
            f"the converted model's token embeddings differ from the original's in {rows:,} of "
            f"{len(table):,} rows (ids the inputs may not use): max |Δ| {site.max_abs_diff:.2e}, "
            f"{site.ratio:.3g}x its tolerance"
        )


def config_heads(hyper: Hyper) -> OriginalHeads:
    """The head counts `hyper` states, for the oracle."""
    return OriginalHeads(hyper.vision_heads, hyper.text_heads, hyper.mit_heads, hyper.prompt_heads)


def oracle_heads(hyper: Hyper) -> OriginalHeads | None:
    """None, the original's own rule (width // 64), and not the config's heads, so wrong heads are
    caught rather than reproduced; below width 64 (small test models) the config's heads."""
    if min(hyper.vision_width, hyper.text_width, hyper.embed_dim) >= HEAD_DIM:
        return None
    return config_heads(hyper)
