"""Build a small real-data folder dataset from scikit-learn's handwritten digits, offline.

    python benchmarks/make_digits.py --out data/digits                 # 480 train + 120 val, 96x96
    python train_enhanced_adaptivestream.py --dataset folder --data-root data/digits \
        --num-seg-classes 2 --num-cls-classes 10 --image-size 96 --epochs 15

Each 8x8 digit of sklearn.datasets.load_digits (real handwriting, 1797 images, values 0-16) is
upscaled (6x at --size 96) and painted in a random colour at a random place on a noisy canvas of a
random colour. Mask: the stroke (1) vs background (0). Label: the digit. Written in the folder layout
of docs/data.md: images/<stem>.png, masks/<stem>.png, labels.csv, splits/train.txt + splits/val.txt
(a fixed split). The same --seed writes the same files.

Unlike the synthetic shapes, a horizontal flip changes what a digit means (2 vs 5 mirrored, 3 vs E):
this is the data the augmentation defaults were measured on (docs/data.md, "How to choose").

scikit-learn is an optional benchmark dependency (pip install scikit-learn); without it this script
stops with exit code 2. Exit codes: 0 written; 2 bad usage or scikit-learn missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

STROKE_THRESHOLD = 0.25  # ink fraction (of 16) above which an upscaled pixel is stroke in the mask


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] float 0-16, labels [N]); SystemExit(2) with the install command if sklearn is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("error: make_digits.py needs scikit-learn (an optional benchmark dependency): "
              "pip install scikit-learn", file=sys.stderr)
        raise SystemExit(2) from None
    digits = load_digits()  # ships inside the scikit-learn package: no download
    return digits.images, digits.target


def render_digit(rng: np.random.Generator, digit: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image [size, size, 3] and uint8 mask [size, size] (1 = stroke) of one 8x8 digit."""
    scale = max(1, round(size / 16))  # 6 at 96: the digit covers a quarter of the canvas area
    # Bilinear upscaling (PIL) keeps the strokes smooth; nearest would make 6x6 blocks.
    ink = np.asarray(Image.fromarray((digit / 16).astype(np.float32), mode="F").resize(
        (8 * scale, 8 * scale), Image.Resampling.BILINEAR)).clip(0, 1)
    background, stroke = rng.uniform(0.0, 0.45, 3), rng.uniform(0.55, 1.0, 3)
    if rng.random() < 0.5:  # dark on light as often as light on dark: brightness alone is no cue
        background, stroke = stroke, background
    image = np.broadcast_to(background, (size, size, 3)).copy()
    mask = np.zeros((size, size), np.uint8)
    top, left = rng.integers(0, size - 8 * scale + 1, 2)
    box = (slice(top, top + 8 * scale), slice(left, left + 8 * scale))
    image[box] = image[box] * (1 - ink[..., None]) + stroke * ink[..., None]
    mask[box] = ink > STROKE_THRESHOLD
    image = image + rng.normal(0, 0.08, image.shape)
    return (image.clip(0, 1) * 255).round().astype(np.uint8), mask


def write_digits(out: Path, size: int = 96, train: int = 480, val: int = 120, seed: int = 0) -> None:
    """images/, masks/, labels.csv and splits/{train,val}.txt under out, deterministic from seed."""
    images, labels = load_sklearn_digits()
    if train < 1 or val < 1 or train + val > len(images):
        raise ValueError(f"--train {train} + --val {val} must be >= 1 each and at most {len(images)} together")
    if size < 16:
        raise ValueError(f"--size {size}: need at least 16 pixels")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(images))[:train + val]
    for folder in ("images", "masks", "splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for index in chosen:
        image, mask = render_digit(rng, images[index], size)
        name = f"digit_{index:04d}.png"  # PNG: JPEG would blur the thin strokes the mask follows
        Image.fromarray(image).save(out / "images" / name)
        Image.fromarray(mask).save(out / "masks" / name)
        names.append(name)
    (out / "labels.csv").write_text("filename,label\n" + "".join(
        f"{name},{int(labels[index])}\n" for name, index in zip(names, chosen)))
    (out / "splits" / "train.txt").write_text("".join(f"{n}\n" for n in names[:train]))
    (out / "splits" / "val.txt").write_text("".join(f"{n}\n" for n in names[train:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (the training --data-root)")
    parser.add_argument("--size", type=int, default=96, help="canvas side in pixels (default 96)")
    parser.add_argument("--train", type=int, default=480, help="training images (default 480)")
    parser.add_argument("--val", type=int, default=120, help="validation images (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="which digits, colours and places (default 0)")
    args = parser.parse_args(argv)
    try:
        write_digits(args.out, args.size, args.train, args.val, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} train + {args.val} val digits ({args.size}x{args.size}) to {args.out}; train with: "
          f"--dataset folder --data-root {args.out} --num-seg-classes 2 --num-cls-classes 10 "
          f"--image-size {args.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
