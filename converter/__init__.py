"""Convert original X-CLIP checkpoints to transformers' XCLIPModel and prove each conversion right:
`convert_checkpoint("k400_32_8.pth", model_name="xclip-base-patch32", output="out")`. `pipeline` runs the
stages, `cli` is its command line; `audit` and `to_original` check and invert published conversions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
DTYPES = ("float32", "float16", "bfloat16")  # what a conversion can write (`--dtype`)
# Verification's tolerance, relative to each site's magnitude (`--atol`): the ORIGINAL code's outputs on
# the goldens differ from the converted model's by <= 3e-7 (tests/test_verify.py), and the subtlest
# planted mistake at full size exceeds it 33x (benchmarks/verification_power.py, docs/verification.md).
DEFAULT_ATOL = 2e-5
# The labels X-CLIP's model cards classify with: --video's default, the card's usage, the audit's first
# sentences and the release fixtures (expected/*.json).
DEFAULT_TEXTS = ("playing sports", "eating spaghetti", "go shopping")
__all__ = ["ConversionResult", "convert_checkpoint", "push", "write_folder"]

if TYPE_CHECKING:
    from converter.pipeline import ConversionResult, convert_checkpoint, push, write_folder


def __getattr__(name: str) -> Any:
    # Lazily: `xclip-convert --list` must not pay for importing torch.
    if name in __all__:
        from converter import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
