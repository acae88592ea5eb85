"""Regenerate crops.npz: frames of other shapes cut from reference.npz's photos, and what the
original X-CLIP test pipeline makes of them (mmcv 1.7.2's Resize + CenterCrop, restated below).

Needs OpenCV (`pip install opencv-python-headless`), which the project does not depend on:
    python tests/data/preprocessing/make_crops.py
It first checks that this restatement reproduces every array of reference.npz bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).parent
# (width, height, image size, photo): common video sizes and odd ones, shrinking and enlarging.
CROPS = [
    (320, 240, 224, "moto_741x500"),
    (340, 256, 224, "coffee_600x400"),
    (455, 256, 336, "retina_crop_1280x720"),
    (640, 360, 224, "retina_crop_1280x720"),
    (480, 270, 336, "astronaut_512x512"),
    (854, 480, 336, "retina_crop_1280x720"),
    (1279, 719, 224, "retina_crop_1280x720"),
    (1000, 563, 336, "retina_crop_1280x720"),
    (270, 480, 224, "hubble_crop_360x640"),
    (359, 639, 336, "hubble_crop_360x640"),
    (224, 224, 336, "astronaut_512x512"),
    (256, 256, 224, "astronaut_512x512"),
    (500, 333, 336, "moto_741x500"),
    (384, 216, 224, "coffee_600x400"),
    (100, 75, 336, "astronaut_rs_171x128"),
    (37, 29, 224, "coffee_crop_342x256"),
]


def original(frame: np.ndarray, image_size: int) -> np.ndarray:
    """mmcv.rescale_size with scale (inf, short) and mmcv.imresize (cv2 INTER_LINEAR), then CenterCrop."""
    short = int(256 / 224 * image_size)
    h, w = frame.shape[:2]
    factor = min(np.inf / max(h, w), short / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    resized = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return resized[top : top + image_size, left : left + image_size]


def main() -> None:
    reference = np.load(HERE / "reference.npz")
    photos = {k.split("/", 1)[1]: reference[k] for k in reference.files if k.startswith("frame/")}
    for name, photo in photos.items():
        for size in (224, 336):
            assert np.array_equal(original(photo, size), reference[f"original{size}/{name}"]), (name, size)
    rng = np.random.default_rng(12)
    out: dict[str, np.ndarray] = {}
    for width, height, size, source in CROPS:
        photo = photos[source]
        top = int(rng.integers(0, photo.shape[0] - height + 1))
        left = int(rng.integers(0, photo.shape[1] - width + 1))
        name = f"{source.split('_')[0]}_{width}x{height}_at_{size}"
        out[f"box/{name}"] = np.array([top, left, height, width, size])
        out[f"source/{name}"] = np.array(source)
        out[f"original/{name}"] = original(photo[top : top + height, left : left + width], size)
    np.savez_compressed(HERE / "crops.npz", **out)
    print(f"wrote {len(CROPS)} crops, OpenCV {cv2.__version__}")


if __name__ == "__main__":
    main()
