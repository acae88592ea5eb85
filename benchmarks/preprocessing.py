"""How far each preprocessing path is from the ORIGINAL X-CLIP pipeline, on real photos.

    python benchmarks/preprocessing.py            # the README table: preprocess_video and the saved processor
    python benchmarks/preprocessing.py --filters  # also every PIL filter the processor could use

|Δ| after normalisation against the original's exact output (tests/data/preprocessing: 7 reference
photos, and 16 crops of them at other shapes); one uint8 level is about 0.0175. "mean" is the largest
per-photo mean |Δ|, "max" the largest |Δ|.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.processing import PROCESSOR_DEVIATION, preprocess_video, processor_pixel_values  # noqa: E402
from tests.preprocessing_data import (  # noqa: E402
    SIZES,
    crop_cases,
    deviation,
    original_output,
    reference_frames,
)

Preprocess = Callable[[np.ndarray, int], torch.Tensor]


def cases(image_size: int, crops: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frame, the original's uint8 output) for the reference photos, or for the crops at this size."""
    if crops:
        return [(frame, original) for _, frame, size, original in crop_cases() if size == image_size]
    return [(frame, original_output(name, image_size)) for name, frame in reference_frames().items()]


def worst(preprocess: Preprocess, image_size: int, crops: bool = False) -> tuple[float, float]:
    stats = [deviation(preprocess(f[None], image_size)[0, 0], o) for f, o in cases(image_size, crops)]
    return max(s[0] for s in stats), max(s[1] for s in stats)


def pil_processor(resample: int) -> Preprocess:
    from converter.processing import build_image_processor

    def run(frames: np.ndarray, image_size: int) -> torch.Tensor:
        processor = build_image_processor(image_size)
        processor.resample = resample
        return processor(list(frames), return_tensors="pt", input_data_format="channels_last")["pixel_values"]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", action="store_true", help="also measure every PIL resampling filter")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    paths: list[tuple[str, Preprocess]] = [
        ("`converter.processing.preprocess_video`", preprocess_video),
        ("saved processor (`AutoProcessor`)", processor_pixel_values),
    ]
    delta = "\\|Δ\\|"
    print(f"| frame size | path | photos: mean {delta} | max {delta} | crops: mean {delta} | max {delta} |")
    print("|---|---|---|---|---|---|")
    for size in SIZES:
        for label, preprocess in paths:
            (rm, rx), (cm, cx) = worst(preprocess, size), worst(preprocess, size, crops=True)
            print(f"| {size} | {label} | {rm:.4f} | {rx:.4f} | {cm:.4f} | {cx:.4f} |")
    print(f"\nstated in converter.processing.PROCESSOR_DEVIATION: {PROCESSOR_DEVIATION}")
    if args.filters:
        from PIL import Image

        print("\nsaved processor with each PIL filter (reference photos and crops together)")
        print("| frame size | filter | mean \\|Δ\\| (average over photos) | largest mean | max \\|Δ\\| |")
        print("|---|---|---|---|---|")
        for size in SIZES:
            frames = cases(size, crops=False) + cases(size, crops=True)
            for resample in Image.Resampling:
                if resample.name.startswith("MKS"):  # Pillow 12+ only: not for a saved processor
                    continue
                run = pil_processor(int(resample))
                stats = [deviation(run(f[None], size)[0, 0], o) for f, o in frames]
                means = [s[0] for s in stats]
                print(
                    f"| {size} | {resample.name} | {np.mean(means):.4f} | {max(means):.4f} "
                    f"| {max(s[1] for s in stats):.4f} |"
                )


if __name__ == "__main__":
    main()
