"""Tiny on-disk datasets for the data tests: a UTKFace-style folder dataset and an Oxford-IIIT Pet fixture.

Both are generated (no download) in the exact layout the training script reads. Sample i is a pure
function of i, so tests can state exact expectations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 45, 39  # odd on purpose: nothing may assume square or multiple-of-32 inputs


def ellipse(width: int, height: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Boolean [H, W] mask of an axis-aligned ellipse (centre and radii as fractions of the size)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return ((xx / width - cx) / rx) ** 2 + ((yy / height - cy) / ry) ** 2 < 1


def face_image(i: int, group: int, width: int = WIDTH, height: int = HEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image [H, W, 3] and uint8 mask [H, W] (0 background, 1 face) of sample i."""
    rng = np.random.default_rng(i)
    face = ellipse(width, height, 0.5 + rng.uniform(-0.1, 0.1), 0.5, 0.3, 0.38)
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = rng.integers(0, 80, 3)
    image[face] = (60 + 40 * group, 120, 200 - 30 * group)  # one skin tone per group
    return image, face.astype(np.uint8)


def utkface_name(i: int, group: int) -> str:
    """UTKFace file name <age>_<gender>_<group>_<date>.jpg."""
    return f"{20 + 7 * i % 60}_{i % 2}_{group}_2017011617452{i:04d}.jpg"


def make_utkface_folder(root: Path, count: int = 20, groups: int = 5, width: int = WIDTH,
                        height: int = HEIGHT) -> list[Path]:
    """images/<age>_<gender>_<group>_<date>.jpg + masks/<stem>_mask.png; returns the image paths."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        group = i % groups
        image, mask = face_image(i, group, width, height)
        path = root / "images" / utkface_name(i, group)
        Image.fromarray(image).save(path, quality=95, subsampling=0)  # 4:4:4: sharp colour edges survive
        Image.fromarray(mask).save(root / "masks" / f"{path.stem}_mask.png")
        paths.append(path)
    return paths


# (image id prefix, class id 1..37, species 1 cat / 2 dog, breed id within the species): real entries of
# Oxford-IIIT Pet's annotations/trainval.txt, whose lines read "Abyssinian_100 1 1 1".
PET_BREEDS = [("Abyssinian", 1, 1, 1), ("american_bulldog", 2, 2, 1), ("Bengal", 6, 1, 3),
              ("yorkshire_terrier", 37, 2, 25)]


def make_oxford_pet(root: Path, train_per_breed: int = 3, test_per_breed: int = 1) -> Path:
    """root/oxford-iiit-pet/{images/<id>.jpg, annotations/trimaps/<id>.png, annotations/{trainval,test}.txt}.

    Trimaps use the dataset's values: 1 pet, 2 background, 3 boundary. Returns root (the DATA_ROOT).
    """
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    n = 0
    for prefix, class_id, species, breed_id in PET_BREEDS:
        for k in range(train_per_breed + test_per_breed):
            image_id = f"{prefix}_{k + 1}"
            rng = np.random.default_rng(n)
            n += 1
            inner = ellipse(WIDTH, HEIGHT, 0.5, 0.5 + rng.uniform(-0.1, 0.1), 0.3, 0.3)
            outer = ellipse(WIDTH, HEIGHT, 0.5, 0.5 + rng.uniform(-0.1, 0.1), 0.36, 0.36) | inner
            trimap = np.full((HEIGHT, WIDTH), 2, np.uint8)
            trimap[outer] = 3
            trimap[inner] = 1
            image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            image[:] = rng.integers(100, 200, 3)
            image[inner] = (40 * species, 30 * class_id % 255, 90)
            Image.fromarray(image).save(base / "images" / f"{image_id}.jpg", quality=95)
            Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{image_id}.png")
            split = "trainval" if k < train_per_breed else "test"
            lines[split].append(f"{image_id} {class_id} {species} {breed_id}")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root
