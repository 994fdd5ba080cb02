"""Train AdaptiveStream: per-pixel segmentation + image classification, with a NaN-guarded loop.

Commands (settings: config.py; every setting also takes a YAML key and a flag):

    python train_enhanced_adaptivestream.py                                  # CPU/GPU, synthetic data
    python train_enhanced_adaptivestream.py --device cuda --epochs 30        # one GPU
    torchrun --standalone --nproc_per_node=4 train_enhanced_adaptivestream.py --device cuda
    python train_enhanced_adaptivestream.py --config my.yaml --out-dir runs/a
    python train_enhanced_adaptivestream.py --out-dir runs/a --resume runs/a/last.pt

Exit codes: 0 finished; 1 training failed (diverged, too many skipped steps);
2 bad usage or input (config, data, checkpoint), with a message naming the key or file.
"""

# ---- Imports and logging ----
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import OxfordIIITPet
from torchvision.transforms import v2
from tqdm import tqdm

from config import Config, ConfigError, color_map_table, load_config

log = logging.getLogger("adaptivestream")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainingFailed(RuntimeError):
    """The run could not go on (diverged, too many skipped steps). main() exits with code 1."""


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(run_dir: Path | None) -> list[logging.Handler]:
    """Console (+ train.log) handlers on the package logger; returned so main() can remove them."""
    log.setLevel(logging.INFO)
    log.propagate = False
    handlers: list[logging.Handler] = [_TqdmHandler()]
    handlers[0].setFormatter(logging.Formatter("%(message)s"))
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        log.addHandler(handler)
    return handlers


# ---- Data ----
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What PIL raises for a missing, truncated or foreign file (SyntaxError: some plugins' "broken PNG").
_PIL_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
SYNTHETIC_STATS_SAMPLE = 64  # synthetic images the start-up summary counts (file datasets: all of them)


class DataError(ValueError):
    """Bad input data; the message names the file. main() exits with code 2."""


def _render_shapes(rng: np.random.Generator, size: int, num_seg_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample: uint8 image [H, W, 3] and uint8 mask [H, W] of shape classes (0 = background)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Smooth random background plus pixel noise: the model has to find shapes, not a flat colour.
    base = rng.uniform(0.2, 0.8, 3)
    tilt = rng.uniform(-0.25, 0.25, (2, 3))
    image = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.integers(1, num_seg_classes))
        cy, cx = rng.uniform(0.2, 0.8, 2)
        r = rng.uniform(0.08, 0.25)
        dy, dx = yy - cy, xx - cx
        shape = (kind - 1) % 4
        if shape == 0:  # disc
            inside = dy**2 + dx**2 < r**2
        elif shape == 1:  # square
            inside = (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
        elif shape == 2:  # triangle, apex up
            inside = (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) * 0.6)
        else:  # diamond
            inside = np.abs(dy) + np.abs(dx) < r
        # Each class has its own hue (learnable colour cue) with jitter, on top of its geometry.
        hue = (kind - 1) / max(num_seg_classes - 1, 1)
        colour = 0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
        image[inside] = np.clip(colour + rng.normal(0, 0.08, 3), 0, 1)
        mask[inside] = kind
    image = image + rng.normal(0, 0.06, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def to_sample(image: torch.Tensor, mask: torch.Tensor, label: int, sample_id: str,
              transform: v2.Transform | None) -> dict[str, Any]:
    """The dict every dataset yields: uint8 image [3, H, W] and mask [H, W] through one joint transform."""
    image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
    if transform is not None:
        image, mask = transform(image, mask)
    return {"image": image.as_subclass(torch.Tensor), "mask": mask.as_subclass(torch.Tensor),
            "label": label, "id": sample_id}


class SyntheticShapes(Dataset):
    """Random filled shapes of several classes on a noisy background.

    Mask = shape class per pixel (0 = background). Label = class of the shape with the most
    visible pixels, minus one, modulo the number of image classes. Sample i is a pure function
    of (seed, split, i), so every worker and every run sees the same data.
    """

    def __init__(self, size: int, image_size: int, num_seg_classes: int, num_cls_classes: int,
                 seed: int, split: str, transform: v2.Transform | None = None):
        self.size, self.image_size, self.transform = size, image_size, transform
        self.num_seg_classes, self.num_cls_classes = num_seg_classes, num_cls_classes
        self.seed, self.split = seed, split
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Untransformed uint8 image [3, H, W], uint8 mask [H, W], label."""
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
            image, mask = _render_shapes(rng, self.image_size, self.num_seg_classes)
            counts = np.bincount(mask.ravel(), minlength=self.num_seg_classes)[1:]
            label = int(counts.argmax()) % self.num_cls_classes
            self._cache[index] = (torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                                  torch.from_numpy(mask), label)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask, label = self.sample(index)
        return to_sample(image, mask, label, f"{self.split}/{index}", self.transform)


def value_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an integer mask and their pixel counts (bincount for uint8: ~20x faster than unique)."""
    if mask.dtype == np.uint8:
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(mask, return_counts=True)


@dataclass
class DataStats:
    """Class frequencies of one split: images per label and mask pixels per class."""

    label_counts: np.ndarray  # [C]
    pixel_counts: np.ndarray  # [S]
    ignored_pixels: int = 0
    images: int = 0  # samples counted

    @classmethod
    def empty(cls, cfg: Config) -> "DataStats":
        return cls(np.zeros(cfg.num_cls_classes, np.int64), np.zeros(cfg.num_seg_classes, np.int64))

    def add(self, values: np.ndarray, counts: np.ndarray, label: int, ignore_index: int) -> None:
        """Count one valid sample (mask values already checked to be classes or ignore_index)."""
        inside = values < len(self.pixel_counts)
        np.add.at(self.pixel_counts, values[inside].astype(np.int64), counts[inside])
        self.ignored_pixels += int(counts[values == ignore_index].sum())
        self.label_counts[label] += 1
        self.images += 1


def _mask_dtype(cfg: Config) -> np.dtype:
    # uint8 is 8x less to pin and copy; int64 only when a class or the ignore value does not fit.
    fits = 0 <= cfg.ignore_index <= 255 and cfg.num_seg_classes <= 256
    return np.dtype(np.uint8 if fits else np.int64)


def open_image(path: Path | str) -> Image.Image:
    """Decoded RGB image; raise DataError naming the file if it is truncated or not an image."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not mid-run
    except _PIL_ERRORS as err:
        raise DataError(f"{path}: cannot read the image ({err}); the file is truncated or not an image: "
                        f"replace or remove it") from None


def read_mask(path: Path, colors: tuple[np.ndarray, np.ndarray] | None, scale: int) -> np.ndarray:
    """Class values [H, W] of a mask PNG: class indices, or colours mapped through (codes, classes)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            if mask.format == "JPEG":
                raise DataError(f"{path}: the mask is a JPEG file; lossy compression mixes class values at "
                                f"edges: save masks as PNG")
            if colors is not None:
                return map_colors(path, np.asarray(mask.convert("RGB")), *colors)
            if mask.mode in ("RGB", "RGBA"):
                rgb = np.asarray(mask)[..., :3]
                grey = (rgb == rgb[..., :1]).all()
                raise DataError(f"{path}: the mask has {len(mask.mode)} channels ({mask.mode}) and color_map is not "
                                f"set: " + ("its channels are equal, save it as a single-channel (mode L) PNG"
                                            if grey else "set color_map (colour -> class) in the YAML config"))
            if mask.mode not in ("L", "P", "1", "I", "I;16"):
                raise DataError(f"{path}: mask mode {mask.mode} is not a class-index image: save single-channel PNGs")
            array = np.array(mask)
    except _PIL_ERRORS as err:
        raise DataError(f"{path}: cannot read the mask ({err}); the file is truncated or not an image") from None
    if array.dtype == bool:  # mode "1"
        array = array.astype(np.uint8)
    if scale > 1:
        off = array % scale != 0
        if off.any():
            raise DataError(f"{path}: mask value {int(array[off][0])} is not a multiple of mask_scale {scale}: "
                            f"the mask was probably resized with bilinear interpolation; resize masks with nearest")
        array = array // scale
    return array


def color_codes(cfg: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """COLOR_MAP as sorted 24-bit colour codes and their classes (for a vectorised lookup), or None."""
    table = color_map_table(cfg)
    if not table:
        return None
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in table], np.int64)
    order = np.argsort(codes)
    return codes[order], np.array(list(table.values()), np.int64)[order]


def map_colors(path: Path, rgb: np.ndarray, codes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class per pixel of an RGB mask [H, W, 3]; raise DataError naming the file and the unknown colours."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pos = np.searchsorted(codes, code).clip(max=len(codes) - 1)
    known = codes[pos] == code
    if not known.all():
        unknown = np.unique(code[~known])
        listed = ", ".join(f"({c >> 16}, {c >> 8 & 255}, {c & 255})" for c in unknown[:5].tolist())
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise DataError(f"{path}: colour {listed}{more} is not in color_map ({int((~known).sum())} pixels): add it "
                        f"to color_map, or repaint the mask without anti-aliasing")
    return classes[pos]


class FileDataset(Dataset):
    """Images, masks and labels read from files; subclasses say where sample i lives and how to read it.

    `keep` lists the samples in use: all of them, minus the bad ones that --skip-bad-samples dropped.
    """

    label_source = ""  # where labels come from, for error messages

    def __init__(self, split: str, transform: v2.Transform | None, mask_dtype: np.dtype):
        self.split, self.transform, self.mask_dtype = split, transform, mask_dtype
        self.keep = list(range(self.count()))
        self.bad: list[str] = []  # messages of the dropped samples
        self.stats: DataStats | None = None  # set by check_datasets
        self.class_names: dict[str, list[str]] = {}  # names the dataset knows (oxford_pet)
        self.split_names: list[str] = []  # file names of the split, to write to the run folder
        self.description = ""  # one line for the start-up summary

    def count(self) -> int:
        raise NotImplementedError

    def path(self, i: int) -> str:
        """The image file of sample i: its id."""
        raise NotImplementedError

    def mask_path(self, i: int) -> str:
        raise NotImplementedError

    def listing_problem(self, i: int) -> str | None:
        """What is wrong with sample i before any file is read (no mask, no label), or None."""
        return None

    def read(self, i: int) -> tuple[Image.Image, np.ndarray, int]:
        """Decoded RGB image, raw mask values [H, W], label; raise DataError naming the file."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.keep[index]
        image, mask, label = self.read(i)
        return to_sample(v2.functional.pil_to_tensor(image), torch.from_numpy(mask.astype(self.mask_dtype)),
                         label, self.path(i), self.transform)


@dataclass
class FolderRecord:
    """One image of a folder dataset; `problem` is set when it is bad before any file is read."""

    image: Path
    mask: Path
    label: int | None
    problem: str | None = None


class FolderDataset(FileDataset):
    """images/<stem>.<ext> + masks/<stem><mask_suffix>.png + a label per image (see list_folder)."""

    def __init__(self, records: list[FolderRecord], cfg: Config, split: str, transform: v2.Transform | None):
        self.records, self.mask_scale = records, cfg.mask_scale
        self.colors = color_codes(cfg)
        self.label_source = f"label_regex '{cfg.label_regex}'" if cfg.label_regex else "labels.csv"
        super().__init__(split, transform, _mask_dtype(cfg))
        self.split_names = [r.image.name for r in records]

    def count(self) -> int:
        return len(self.records)

    def path(self, i: int) -> str:
        return str(self.records[i].image)

    def mask_path(self, i: int) -> str:
        return str(self.records[i].mask)

    def listing_problem(self, i: int) -> str | None:
        return self.records[i].problem

    def read(self, i: int) -> tuple[Image.Image, np.ndarray, int]:
        record = self.records[i]
        return open_image(record.image), read_mask(record.mask, self.colors, self.mask_scale), record.label


def read_labels_csv(path: Path) -> dict[str, str]:
    """labels.csv rows `filename,label` (optional header) as file name -> label text."""
    labels: dict[str, str] = {}
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#") or (line == 1 and [c.strip().lower() for c in row] == ["filename",
                                                                                                       "label"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected 'filename,label', got {','.join(row)!r}")
            name = row[0].strip()
            if name in labels:
                raise DataError(f"{path}:{line}: {name} is listed twice")
            labels[name] = row[1].strip()
    return labels


def parse_label(text: str, names: list[str] | None) -> int | None:
    """A label as a class index: a cls_class_names entry or an integer; None if it is neither."""
    if names and text in names:
        return names.index(text)
    try:
        return int(text)
    except ValueError:
        return None


def list_folder(cfg: Config) -> list[FolderRecord]:
    """Every image of DATA_ROOT/images with its mask path and label (bad ones carry their problem)."""
    root = Path(cfg.data_root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder: a folder dataset needs images/ and masks/ under "
                            f"{root} (see README, 'Train on your own data')")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{images_dir} holds no images ({' '.join(IMAGE_EXTENSIONS)}): the dataset is empty")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise DataError(f"{stems[path.stem]} and {path} have the same stem: their masks would be the same file")
        stems[path.stem] = path
    labels_csv = root / "labels.csv"
    if cfg.label_regex is None and not labels_csv.is_file():
        raise DataError(f"{labels_csv} does not exist: give image labels in labels.csv (filename,label) or set "
                        f"label_regex")
    table = read_labels_csv(labels_csv) if cfg.label_regex is None else {}
    mask_names = {p.name for p in masks_dir.iterdir()}
    records = []
    for path in files:
        mask = masks_dir / f"{path.stem}{cfg.mask_suffix}.png"
        problems = []
        if mask.name not in mask_names:
            other = [f"{path.stem}{cfg.mask_suffix}{e}" for e in IMAGE_EXTENSIONS
                     if f"{path.stem}{cfg.mask_suffix}{e}" in mask_names]
            problems.append(f"{mask}: missing mask of {path}" +
                            (f" (found {other[0]}: masks must be PNG, JPEG changes class values)" if other else ""))
        if cfg.label_regex is not None:
            match = re.search(cfg.label_regex, path.name)
            text = match.group(1) if match else None
            where = f"the file name does not match label_regex '{cfg.label_regex}'"
        else:
            text = table.get(path.name, table.get(path.stem))
            where = f"not listed in {labels_csv}"
        label = None if text is None else parse_label(text, cfg.cls_class_names)
        if text is None:
            problems.append(f"{path}: no label ({where})")
        elif label is None:
            problems.append(f"{path}: label {text!r} is neither an integer nor a class name in cls_class_names "
                            f"{cfg.cls_class_names or []}")
        records.append(FolderRecord(path, mask, label, "; ".join(problems) or None))
    return records


def _read_split_file(path: Path, by_stem: dict[str, FolderRecord]) -> list[FolderRecord]:
    chosen = []
    for line, text in enumerate(path.read_text().splitlines(), 1):
        name = text.strip()
        if not name or name.startswith("#"):
            continue
        stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
        if stem not in by_stem:
            raise DataError(f"{path}:{line}: {name} is not an image in {path.parent.parent / 'images'}")
        chosen.append(by_stem[stem])
    if not chosen:
        raise DataError(f"{path} lists no images: the split is empty")
    return chosen


def split_folder(root: Path, records: list[FolderRecord], val_fraction: float
                 ) -> tuple[list[FolderRecord], list[FolderRecord], str]:
    """(train, val, how): splits/train.txt + splits/val.txt if present, else a file-name-hash split."""
    lists = (root / "splits" / "train.txt", root / "splits" / "val.txt")
    by_stem = {r.image.stem: r for r in records}
    if any(p.is_file() for p in lists):
        missing = [str(p) for p in lists if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]} does not exist: splits/ needs both train.txt and val.txt (or neither, "
                            f"for a {val_fraction:.0%} split by file name)")
        train, val = (_read_split_file(p, by_stem) for p in lists)
        both = {r.image.stem for r in train} & {r.image.stem for r in val}
        if both:
            raise DataError(f"{lists[0]} and {lists[1]} both list {sorted(both)[:5]}: a file belongs to one split")
        return train, val, "splits/train.txt + splits/val.txt"
    if len(records) < 2:
        raise DataError(f"{root / 'images'} holds {len(records)} image: a train/val split needs at least 2")
    # Ranked by a hash of the file name: the same split on every run and every machine, whatever the seed.
    ranked = sorted(records, key=lambda r: hashlib.sha1(r.image.stem.encode()).hexdigest())
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    val_stems = {r.image.stem for r in ranked[:n_val]}
    return ([r for r in records if r.image.stem not in val_stems], [r for r in records if r.image.stem in val_stems],
            f"{val_fraction:.0%} of the images by file-name hash")


def build_folder_datasets(cfg: Config) -> tuple[FolderDataset, FolderDataset]:
    root = Path(cfg.data_root)
    train, val, how = split_folder(root, list_folder(cfg), cfg.val_fraction)
    datasets = (FolderDataset(train, cfg, "train", build_transforms(cfg, train=True)),
                FolderDataset(val, cfg, "val", build_transforms(cfg, train=False)))
    for ds in datasets:
        ds.description = f"folder {root} | labels from {ds.label_source} | split: {how}"
    return datasets


class OxfordPetDataset(FileDataset):
    """Oxford-IIIT Pet through torchvision.datasets.OxfordIIITPet; trimaps become background / pet / ignore."""

    label_source = "the Oxford-IIIT Pet annotation list"

    def __init__(self, cfg: Config, split: str, transform: v2.Transform | None):
        root = Path(cfg.data_root)
        target = "category" if cfg.pet_target == "breed" else "binary-category"
        try:
            self.pet = OxfordIIITPet(root, split="trainval" if split == "train" else "test",
                                     target_types=[target, "segmentation"], download=cfg.download)
        except RuntimeError as err:  # torchvision's "Dataset not found. You can use download=True ..."
            raise DataError(f"{root / 'oxford-iiit-pet'}: {err}: it needs images/ and annotations/ (trimaps/, "
                            f"trainval.txt, test.txt) from the Oxford-IIIT Pet archives, or pass --download") from None
        except (OSError, ValueError) as err:  # missing or malformed annotation list, failed download
            raise DataError(f"{root / 'oxford-iiit-pet'}: cannot read the dataset ({type(err).__name__}: {err})"
                            ) from None
        # torchvision keeps the file lists private; they are what error messages and sample ids must name.
        self.images, self.trimaps = self.pet._images, self.pet._segs
        labels = self.pet._labels if target == "category" else self.pet._bin_labels
        # Trimap 1 = pet, 2 = background, 3 = boundary (not scored); anything else is a bad file.
        self.lut = np.zeros(256, np.int64)
        self.lut[[1, 2, 3]] = [1, 0, cfg.ignore_index]
        super().__init__(split, transform, _mask_dtype(cfg))
        self.split_names = [p.name for p in self.images]
        # torchvision lists only the breeds present, in label order.
        self.label_names = (dict(zip(sorted(set(labels)), self.pet.classes)) if target == "category"
                            else dict(enumerate(self.pet.bin_classes)))
        self.description = f"oxford_pet {root} | {cfg.pet_target} labels | split: trainval -> train, test -> val"

    def count(self) -> int:
        return len(self.images)

    def path(self, i: int) -> str:
        return str(self.images[i])

    def mask_path(self, i: int) -> str:
        return str(self.trimaps[i])

    def read(self, i: int) -> tuple[Image.Image, np.ndarray, int]:
        try:
            image, (label, trimap) = self.pet[i]  # torchvision decodes the image (convert("RGB")) here
            trimap = np.array(trimap)
        except _PIL_ERRORS as err:
            raise DataError(f"{self.path(i)} or {self.mask_path(i)}: cannot read ({err}); the file is truncated "
                            f"or not an image") from None
        values = value_counts(trimap)[0] if trimap.ndim == 2 and trimap.dtype == np.uint8 else None
        if values is None or not set(values.tolist()) <= {1, 2, 3}:
            raise DataError(f"{self.mask_path(i)}: not an Oxford-IIIT Pet trimap (mode {trimap.dtype}, "
                            f"{trimap.ndim} dims, values {np.unique(trimap)[:8].tolist()}; expected 1 = pet, "
                            f"2 = background, 3 = boundary)")
        return image, self.lut[trimap], label


def build_pet_datasets(cfg: Config) -> tuple[OxfordPetDataset, OxfordPetDataset]:
    train = OxfordPetDataset(cfg, "train", build_transforms(cfg, train=True))
    val = OxfordPetDataset(cfg, "val", build_transforms(cfg, train=False))
    names = {**val.label_names, **train.label_names}
    train.class_names = val.class_names = {
        "seg": ["background", "pet"], "cls": [names.get(i, f"cls{i}") for i in range(cfg.num_cls_classes)]}
    return train, val


def _check_one(ds: FileDataset, cfg: Config, i: int) -> tuple[str | None, Any, Any, int]:
    """(problem or None, mask values, their pixel counts, label) of sample i; reads its files once."""
    problem = ds.listing_problem(i)
    if problem is not None:
        return problem, None, None, -1
    try:
        image, mask, label = ds.read(i)
    except DataError as err:
        return str(err), None, None, -1
    width, height = image.size
    if mask.shape != (height, width):
        return (f"{ds.mask_path(i)}: the mask is {mask.shape[-1]}x{mask.shape[0]} but its image {ds.path(i)} is "
                f"{width}x{height} (W x H): a mask must have its image's size"), None, None, -1
    values, counts = value_counts(mask)
    outside = values[((values < 0) | (values >= cfg.num_seg_classes)) & (values != cfg.ignore_index)]
    if len(outside):
        hint = " (masks look like 0/255: set mask_scale or ignore_index)" if values.tolist() == [0, 255] else ""
        return (f"{ds.mask_path(i)}: mask values {outside[:8].tolist()} are outside [0, {cfg.num_seg_classes}) "
                f"and not ignore_index {cfg.ignore_index}{hint}"), None, None, -1
    if not 0 <= label < cfg.num_cls_classes:
        return (f"{ds.path(i)}: label {label} (from {ds.label_source}) is outside [0, {cfg.num_cls_classes}): "
                f"fix the label or num_cls_classes"), None, None, -1
    return None, values, counts, label


def scan_dataset(ds: FileDataset, cfg: Config) -> tuple[list[tuple[int, str]], list[str]]:
    """Read every sample of ds once (threads: PIL decodes without the GIL) and set ds.stats.

    Returns the bad samples as (index, message) and the masks whose only values are 0 and 255.
    """
    stats, bad, zero_255 = DataStats.empty(cfg), [], []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda i: _check_one(ds, cfg, i), range(ds.count()))
        for i, (problem, values, counts, label) in enumerate(results):
            if problem is not None:
                bad.append((i, problem))
                continue
            stats.add(values, counts, label, cfg.ignore_index)
            if values.tolist() == [0, 255]:
                zero_255.append(ds.mask_path(i))
    ds.stats = stats
    return bad, zero_255


def check_datasets(cfg: Config, train: FileDataset, val: FileDataset) -> None:
    """Read every image, mask and label once; raise DataError listing every bad file, or drop the bad samples.

    Checks: the image decodes (truncated and foreign files fail), the mask exists, is a PNG with one channel
    (or colours in color_map), has the image's size and only values in [0, NUM_SEG_CLASSES) or IGNORE_INDEX;
    the label exists and is in [0, NUM_CLS_CLASSES).
    """
    start = time.perf_counter()
    found = {ds.split: scan_dataset(ds, cfg) for ds in (train, val)}
    zero_255 = [path for _, paths in found.values() for path in paths]
    class_pixels = sum(int(ds.stats.pixel_counts[1:].sum()) for ds in (train, val))
    if zero_255 and class_pixels == 0 and cfg.ignore_index == 255:
        raise DataError(f"every mask holds only 0 and 255 (e.g. {', '.join(zero_255[:3])}), and 255 is ignore_index: "
                        f"nothing but background would be learned (masks look like 0/255: set mask_scale or "
                        f"ignore_index). mask_scale: 255 reads them as classes 0/1")
    problems = [message for bad, _ in found.values() for _, message in bad]
    if problems and not cfg.skip_bad_samples:
        raise DataError(f"{len(problems)} bad sample(s) found at start-up; nothing was trained. Fix or remove them, "
                        f"or pass --skip-bad-samples to train without them:\n  " + "\n  ".join(sorted(problems)))
    for ds in (train, val):
        dropped = {i for i, _ in found[ds.split][0]}
        ds.keep = [i for i in range(ds.count()) if i not in dropped]
        ds.bad = sorted(message for _, message in found[ds.split][0])
        if not ds.keep:
            raise DataError(f"the {ds.split} split is empty: all {ds.count()} of its samples are bad, e.g. {ds.bad[0]}")
    log.info("checked %d samples in %.1fs: every image decoded; every mask read (PNG, one channel or color_map, "
             "image's size, values); every label in range", train.count() + val.count(), time.perf_counter() - start)


class _ExactMaskResampling:
    """Masks resampled with NEAREST_EXACT (pixel centres, as the image's bilinear resize samples them).

    v2 resizes a tv_tensors.Mask with legacy NEAREST (floor), which shifts a downscaled mask up to half an
    output pixel towards the top-left of its image: at 39 -> 32 px, 8% of block-mask pixels disagreed with
    the thresholded image, against 0.1% with NEAREST_EXACT.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Mask):
            return super().transform(inpt, params)
        if "height" in params:  # RandomResizedCrop: crop the same box first
            inpt = v2.functional.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        return v2.functional.resize(inpt, self.size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
                                    max_size=getattr(self, "max_size", None))


class MaskAlignedResize(_ExactMaskResampling, v2.Resize):
    pass


class MaskAlignedRandomResizedCrop(_ExactMaskResampling, v2.RandomResizedCrop):
    pass


def build_transforms(cfg: Config, train: bool) -> v2.Transform:
    """Joint image/mask transforms: v2 resamples a tv_tensors.Mask with nearest, and colour ops skip it."""
    size = cfg.image_size
    if cfg.dataset == "synthetic":  # rendered at image_size; a crop could change which shape sets the label
        steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
        if train:
            steps.append(v2.RandomHorizontalFlip())
    elif train:
        steps = [MaskAlignedRandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                 v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)]  # hue: 10x slower
    else:
        steps = [MaskAlignedResize(size, antialias=True), v2.CenterCrop(size)]  # shorter side to size, then centre
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def class_names(cfg: Config) -> dict[str, list[str]]:
    return {"seg": cfg.seg_class_names or [f"seg{i}" for i in range(cfg.num_seg_classes)],
            "cls": cfg.cls_class_names or [f"cls{i}" for i in range(cfg.num_cls_classes)]}


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for cfg.dataset; raise DataError naming the file on bad data."""
    if cfg.dataset == "synthetic":
        common = dict(image_size=cfg.image_size, num_seg_classes=cfg.num_seg_classes,
                      num_cls_classes=cfg.num_cls_classes, seed=cfg.seed)
        return (SyntheticShapes(cfg.synthetic_train_size, split="train",
                                transform=build_transforms(cfg, train=True), **common),
                SyntheticShapes(cfg.synthetic_val_size, split="val",
                                transform=build_transforms(cfg, train=False), **common))
    train, val = build_folder_datasets(cfg) if cfg.dataset == "folder" else build_pet_datasets(cfg)
    check_datasets(cfg, train, val)
    return train, val


def dataset_stats(ds: Dataset, cfg: Config) -> tuple[DataStats, str]:
    """Class frequencies of ds and what they cover: the start-up scan of a file dataset, or a synthetic sample."""
    if isinstance(ds, FileDataset):
        return ds.stats, f"all {ds.stats.images} images"
    stats = DataStats.empty(cfg)
    step = max(1, len(ds) // SYNTHETIC_STATS_SAMPLE)
    for i in range(0, len(ds), step)[:SYNTHETIC_STATS_SAMPLE]:
        _, mask, label = ds.sample(i)
        stats.add(*value_counts(mask.numpy()), label, cfg.ignore_index)
    return stats, f"{stats.images} of {len(ds)} images"


def inverse_frequency(counts: np.ndarray) -> list[float]:
    """Weights total / (K * count_c) over the K classes present ("balanced"); 0 for an absent class."""
    present = counts > 0
    weights = np.zeros(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return [float(w) for w in weights]


def resolve_data_settings(cfg: Config, train_ds: Dataset) -> None:
    """Fill in what the data decides: class names the dataset knows, and "auto" class weights (logged)."""
    for head in ("seg", "cls"):
        known = getattr(train_ds, "class_names", {}).get(head)
        if getattr(cfg, f"{head}_class_names") is None and known:
            setattr(cfg, f"{head}_class_names", known)
    stats, covers = dataset_stats(train_ds, cfg)
    for key, counts, what in (("seg_class_weights", stats.pixel_counts, "mask pixels"),
                              ("cls_class_weights", stats.label_counts, "image labels")):
        if getattr(cfg, key) == "auto":
            setattr(cfg, key, inverse_frequency(counts))
            log.info("%s auto -> [%s] (inverse frequency of %s over %s of the training split)", key,
                     ", ".join(f"{w:.4g}" for w in getattr(cfg, key)), what, covers)
            if not counts.all():
                log.warning("%s: class(es) %s never occur in the training split (weight 0)", key,
                            [class_names(cfg)[key[:3]][c] for c in np.flatnonzero(counts == 0)])


def _format_counts(counts: np.ndarray, names: list[str], limit: int = 8) -> str:
    """'name n (p%)' per class; the largest and smallest few when there are many classes."""
    total = max(int(counts.sum()), 1)
    order = list(range(len(counts)))
    if len(counts) > limit:
        ranked = sorted(order, key=lambda c: -counts[c])
        order = ranked[:limit // 2] + ranked[-(limit // 2):]
    parts = [f"{names[c]} {int(counts[c])} ({100 * counts[c] / total:.1f}%)" for c in order]
    if len(counts) > limit:
        parts.insert(limit // 2, f"... ({len(counts)} classes)")
    return ", ".join(parts)


def report_data(cfg: Config, train_ds: Dataset, val_ds: Dataset, run_dir: Path) -> None:
    """Log the one-screen data summary and imbalance warnings; write the split and the dropped samples."""
    names = class_names(cfg)
    stats, covers = dataset_stats(train_ds, cfg)
    lines = [f"data: {getattr(train_ds, 'description', '') or cfg.dataset} | {len(train_ds)} train, "
             f"{len(val_ds)} val images",
             f"  image labels (train): {_format_counts(stats.label_counts, names['cls'])}",
             f"  mask pixels (train, {covers}): {_format_counts(stats.pixel_counts, names['seg'])}; "
             f"{stats.ignored_pixels} ignored"]
    log.info("\n".join(lines))
    for counts, head, what in ((stats.pixel_counts, "seg", "mask pixels"), (stats.label_counts, "cls", "image labels")):
        top = int(counts.argmax())
        share = counts[top] / max(counts.sum(), 1)
        if share > 0.95 and getattr(cfg, f"{head}_class_weights") is None:
            log.warning("class imbalance: %s holds %.1f%% of the training %s; a model can score well by always "
                        "predicting it. Consider --%s-class-weights auto (inverse-frequency weights)",
                        names[head][top], 100 * share, what, head)
    if isinstance(train_ds, FolderDataset):
        (run_dir / "splits").mkdir(exist_ok=True)
        for ds in (train_ds, val_ds):
            (run_dir / "splits" / f"{ds.split}.txt").write_text("".join(f"{n}\n" for n in ds.split_names))
        log.info("split written to %s (copy it to DATA_ROOT/splits/ to fix it)", run_dir / "splits")
    bad = [message for ds in (train_ds, val_ds) for message in getattr(ds, "bad", [])]
    if bad:
        (run_dir / "bad_samples.txt").write_text("".join(f"{m}\n" for m in bad))
        shown = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
        log.warning("--skip-bad-samples: dropped %d bad sample(s), listed in %s:\n  %s", len(bad),
                    run_dir / "bad_samples.txt", shown)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker from its generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(cfg: Config, train_ds: Dataset, val_ds: Dataset, device: torch.device,
                  rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Seeded loaders (same batches on every run); DistributedSampler shards when world_size > 1."""
    if len(train_ds) < cfg.batch_size * world_size:
        raise DataError(f"training set has {len(train_ds)} images, fewer than one batch "
                        f"({cfg.batch_size} x {world_size} processes): lower --batch-size")
    generator = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, worker_init_fn=_seed_worker,
                  pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler
        train_sampler = DistributedSampler(train_ds, world_size, rank, shuffle=True, seed=cfg.seed, drop_last=True)
        val_sampler = DistributedSampler(val_ds, world_size, rank, shuffle=False)
        train = DataLoader(train_ds, sampler=train_sampler, drop_last=True, generator=generator, **common)
        val = DataLoader(val_ds, sampler=val_sampler, **common)
    else:
        train = DataLoader(train_ds, shuffle=True, drop_last=True, generator=generator, **common)
        val = DataLoader(val_ds, shuffle=False, **common)
    return train, val


# ---- Model ----
def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x), inplace=True)


class BuiltinEncoder(nn.Module):
    """Small plain-conv encoder sized for speed: one stage per stride 2, 4, 8, 16, 32."""

    def __init__(self, width: int):
        super().__init__()
        self.channels = [width, width * 2, width * 4, width * 8, width * 16]
        stages, cin = [], 3
        for i, cout in enumerate(self.channels):
            layers: list[nn.Module] = [conv_bn_relu(cin, cout, stride=2)]
            if i >= 2:  # residual blocks only where the resolution is low enough to be cheap
                layers.append(ResidualBlock(cout))
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # strides 2, 4, 8, 16, 32


class TorchvisionEncoder(nn.Module):
    """A torchvision classifier's feature layers, grouped into stages at strides 2..32."""

    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        import torchvision

        weights = "DEFAULT" if pretrained else None
        try:
            net = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad cached file a RuntimeError
            raise ConfigError(f"pretrained: could not load torchvision's ImageNet weights for {name} ({err}). "
                              f"This machine may be offline: copy the weights file into "
                              f"{Path(torch.hub.get_dir()) / 'checkpoints'} or drop --pretrained") from None
        if name.startswith("resnet"):
            layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
        else:
            layers = list(net.features)
        # Group consecutive layers by output stride, found by a dry run, so no per-model table is needed.
        groups: list[list[nn.Module]] = []
        strides, x, size = [], torch.zeros(1, 3, 64, 64), 64
        with torch.no_grad():
            was_training = net.training
            net.eval()
            for layer in layers:
                x = layer(x)
                stride = size // x.shape[-1]
                if strides and strides[-1] == stride:
                    groups[-1].append(layer)
                else:
                    groups.append([layer])
                    strides.append(stride)
            net.train(was_training)
        if strides != [2, 4, 8, 16, 32]:
            raise ConfigError(f"backbone: {name} has strides {strides}, expected 2, 4, 8, 16, 32")
        self.stages = nn.ModuleList(nn.Sequential(*g) for g in groups)
        self.channels = []
        x = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            self.eval()
            for stage in self.stages:
                x = stage(x)
                self.channels.append(x.shape[1])
            self.train()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpStage(nn.Module):
    """ConvTranspose2d(k=4, s=2, p=1) doubles H and W exactly; then a 3x3 conv fuses the skip of that stride."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
                                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.fuse = conv_bn_relu(cout + cskip, cout) if cskip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)  # [B, cout, 2h, 2w]
        return x if self.fuse is None else self.fuse(torch.cat([x, skip], dim=1))


class AdaptiveStream(nn.Module):
    """Encoder to stride 32 -> 1x1 stream projection -> five ConvTranspose2d stages back to input size.

    forward(x [B, 3, H, W]) -> (seg_logits [B, S, H, W], cls_logits [B, C]) for any H, W: the input is
    padded to a multiple of 32 and the logits cropped back, so they always match the target's size.
    The classification head sees the pooled bottleneck and pooled decoder features: a head on the
    bottleneck alone depends on BatchNorm statistics of one deep path and its eval accuracy can decay.
    """

    def __init__(self, num_seg_classes: int, num_cls_classes: int, backbone: str = "adaptivestream",
                 pretrained: bool = False, width: int = 16, stream_channels: int = 128, decoder_channels: int = 16):
        super().__init__()
        if backbone == "adaptivestream":
            self.encoder: nn.Module = BuiltinEncoder(width)
        else:
            self.encoder = TorchvisionEncoder(backbone, pretrained)
        enc = self.encoder.channels  # strides 2, 4, 8, 16, 32
        self.stream = conv_bn_relu(enc[4], stream_channels, kernel=1)
        # Output channels at strides 16, 8, 4, 2, 1. The last stage has no encoder feature to fuse and
        # runs at full resolution, where every channel costs most: keep it thin (see benchmarks/).
        dec = [decoder_channels * m for m in (8, 4, 2, 1)] + [max(decoder_channels // 2, 4)]
        skips = [enc[3], enc[2], enc[1], enc[0], 0]
        cins = [stream_channels] + dec[:-1]
        self.decoder = nn.ModuleList(UpStage(ci, cs, co) for ci, cs, co in zip(cins, skips, dec))
        self.seg_head = nn.Conv2d(dec[-1], num_seg_classes, 1)
        pooled = stream_channels + dec[0] + dec[1] + dec[2]
        self.cls_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(pooled, num_cls_classes))
        self._init_weights(pretrained_encoder=pretrained and backbone != "adaptivestream")

    def _init_weights(self, pretrained_encoder: bool) -> None:
        for name, module in self.named_modules():
            if pretrained_encoder and name.startswith("encoder"):
                continue
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Small last layers: logit std about 0.7 at init, so each head's initial loss is within a few
        # percent of ln(C). Much smaller (1e-3) measured slower: Adam grows a weight by ~lr per step,
        # and the seg head took >1000 steps to beat the class prior (see the closing note of issue 2).
        for head in (self.seg_head, self.cls_head[-1]):
            nn.init.normal_(head.weight, std=0.5 * head.weight[0].numel() ** -0.5)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % 32, (-width) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zero = the mean colour after normalisation
        feats = self.encoder(x)  # strides 2, 4, 8, 16, 32
        y = self.stream(feats[4])  # [B, stream, H/32, W/32]
        pooled = [y.mean(dim=(2, 3))]
        for i, (stage, skip) in enumerate(zip(self.decoder, [feats[3], feats[2], feats[1], feats[0], None])):
            y = stage(y, skip)
            if i < 3:
                pooled.append(y.mean(dim=(2, 3)))
        seg = self.seg_head(y)[..., :height, :width]  # [B, S, H, W]
        cls = self.cls_head(torch.cat(pooled, dim=1))  # [B, C]
        return seg, cls


def build_model(cfg: Config) -> AdaptiveStream:
    return AdaptiveStream(cfg.num_seg_classes, cfg.num_cls_classes, backbone=cfg.backbone,
                          pretrained=cfg.pretrained, width=cfg.width, stream_channels=cfg.stream_channels,
                          decoder_channels=cfg.decoder_channels)


# ---- Loss ----
class StableLoss(nn.Module):
    """SEG_WEIGHT x segmentation CE + CLS_WEIGHT x classification CE, in float32 even under autocast.

    Logits go through the smooth bound c*x/(c+|x|): bounded by c, and unlike c*tanh(x/c), whose
    float32 gradient is exactly 0 once |x| > ~9c, its gradient never vanishes. A non-finite loss is
    returned as it is: the training loop's guard skips that step and counts it.
    """

    def __init__(self, seg_weight: float = 1.0, cls_weight: float = 0.5, ignore_index: int = 255,
                 seg_class_weights: Iterable[float] | None = None, cls_class_weights: Iterable[float] | None = None,
                 logit_bound: float = 15.0, label_smoothing: float = 0.0):
        super().__init__()
        self.seg_weight, self.cls_weight = seg_weight, cls_weight
        self.ignore_index, self.logit_bound, self.label_smoothing = ignore_index, logit_bound, label_smoothing
        self.register_buffer("seg_class_weights", None if seg_class_weights is None
                             else torch.tensor(list(seg_class_weights), dtype=torch.float32))
        self.register_buffer("cls_class_weights", None if cls_class_weights is None
                             else torch.tensor(list(cls_class_weights), dtype=torch.float32))

    def bound(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.logit_bound
        return c * logits / (c + logits.abs())

    def forward(self, seg_logits: torch.Tensor, cls_logits: torch.Tensor, seg_target: torch.Tensor,
                cls_target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if seg_logits.dim() != 4 or seg_target.shape != (seg_logits.shape[0], *seg_logits.shape[2:]):
            raise ValueError(f"segmentation logits {tuple(seg_logits.shape)} [B, S, H, W] do not match "
                             f"target {tuple(seg_target.shape)} [B, H, W]: the decoder must output the target's size")
        if cls_logits.dim() != 2 or cls_target.shape != cls_logits.shape[:1]:
            raise ValueError(f"classification logits {tuple(cls_logits.shape)} [B, C] do not match "
                             f"target {tuple(cls_target.shape)} [B]")
        seg_target = seg_target.long()
        per_pixel = F.cross_entropy(self.bound(seg_logits.float()), seg_target, weight=self.seg_class_weights,
                                    ignore_index=self.ignore_index, reduction="none",
                                    label_smoothing=self.label_smoothing)
        valid = seg_target != self.ignore_index
        if self.seg_class_weights is None:
            weight_sum = valid.sum()
        else:
            weight_sum = (self.seg_class_weights[seg_target.where(valid, 0)] * valid).sum()
        # Mean over scored pixels; a batch with no scored pixel contributes 0, not 0/0 = NaN.
        seg_loss = per_pixel.sum() / weight_sum.clamp_min(1e-12)
        cls_loss = F.cross_entropy(self.bound(cls_logits.float()), cls_target.long(), weight=self.cls_class_weights,
                                   label_smoothing=self.label_smoothing)
        total = self.seg_weight * seg_loss + self.cls_weight * cls_loss
        return total, {"seg": seg_loss.detach(), "cls": cls_loss.detach()}


def build_loss(cfg: Config) -> StableLoss:
    return StableLoss(cfg.seg_weight, cfg.cls_weight, cfg.ignore_index, cfg.seg_class_weights,
                      cfg.cls_class_weights, cfg.logit_bound, cfg.label_smoothing)


# ---- LR schedule ----
class WarmupLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to each group's base LR, then cosine / exponential / constant decay; stepped per iteration.

    The LR is a pure function of the step (plus lr_scale, the divergence back-off factor), clamped to
    [min_lr, base_lr]: no schedule can go below min_lr, whatever total_steps or gamma say.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float,
                 decay: str = "cosine", gamma: float = 0.95, steps_per_epoch: int = 1, last_epoch: int = -1):
        if decay not in ("cosine", "exponential", "constant"):
            raise ValueError(f"decay must be cosine, exponential or constant, got {decay!r}")
        self.warmup_steps, self.total_steps, self.min_lr = max(0, warmup_steps), max(1, total_steps), min_lr
        self.decay, self.gamma, self.steps_per_epoch = decay, gamma, max(1, steps_per_epoch)
        self.lr_scale = 1.0
        super().__init__(optimizer, last_epoch)

    def decay_factor(self, step: int) -> float:
        """Fraction of the way from min_lr to the base LR after warm-up: 1 at its start."""
        done = step - self.warmup_steps
        if self.decay == "cosine":
            progress = min(1.0, done / max(1, self.total_steps - self.warmup_steps - 1))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "exponential":
            return self.gamma ** (done / self.steps_per_epoch)
        return 1.0

    def lr_at(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            lr = base_lr * (step + 1) / self.warmup_steps
        else:
            lr = self.min_lr + (base_lr - self.min_lr) * self.decay_factor(step)
        return min(base_lr, max(self.min_lr, lr * self.lr_scale))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Fused optimizers: they take the guard's found_inf flag and skip on the device (no host sync)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 else decay).append(param)  # no decay on BN and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.base_lr, fused=True)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupLRScheduler:
    return WarmupLRScheduler(optimizer, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                             total_steps=cfg.epochs * steps_per_epoch, min_lr=cfg.min_lr, decay=cfg.lr_decay,
                             gamma=cfg.lr_gamma, steps_per_epoch=steps_per_epoch)


# ---- Guard ----
SKIP_REASONS = {1: "non-finite loss", 2: "non-finite gradient", 3: "gradient explosion",
                4: "gradient spike", 5: "loss spike"}


class StepGuard:
    """Decides on the device whether a step is applied, and undoes what the forward pass changed.

    reason(loss, grad_norm) -> int tensor: 0 accept, else a SKIP_REASONS code. The optimizer receives
    the verdict as found_inf (fused AdamW/SGD leave parameters, moments and step count untouched when
    it is 1), and commit() puts BatchNorm running statistics back with torch.where: a NaN batch in
    train mode would otherwise poison them even though its step was skipped. No host sync.
    """

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]
        self.stash = [torch.empty_like(b) for b in self.buffers]
        self.skip_grad_norm = cfg.skip_grad_norm
        self.grad_spike, self.loss_spike = cfg.grad_spike_factor, cfg.loss_spike_factor
        self.spike_warmup = cfg.spike_warmup
        window = cfg.spike_window
        self.history = torch.full((2, window), float("nan"), device=device)  # [grad norm, loss] of accepted steps
        self.accepted = torch.zeros((), dtype=torch.long, device=device)

    def stash_buffers(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.stash, self.buffers)

    def reason(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        reason = torch.zeros((), dtype=torch.long, device=loss.device)
        if self.grad_spike > 0 or self.loss_spike > 0:
            median = self.history.nanmedian(dim=1).values  # [2]
            warm = self.accepted >= self.spike_warmup
            if self.loss_spike > 0:
                reason = torch.where(warm & (loss > self.loss_spike * median[1]), 5, reason)
            if self.grad_spike > 0:
                reason = torch.where(warm & (grad_norm > self.grad_spike * median[0]), 4, reason)
        # Later checks overwrite earlier ones: the most basic cause is reported.
        reason = torch.where(grad_norm > self.skip_grad_norm, 3, reason)
        reason = torch.where(~torch.isfinite(grad_norm), 2, reason)
        return torch.where(~torch.isfinite(loss), 1, reason)

    def commit(self, skip: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        for buf, old in zip(self.buffers, self.stash):
            buf.copy_(torch.where(skip, old, buf))
        if self.grad_spike > 0 or self.loss_spike > 0:
            slot = (self.accepted % self.history.shape[1]).view(1)
            new = torch.stack([grad_norm.float(), loss.float()]).view(2, 1)
            self.history.index_copy_(1, slot, torch.where(skip, self.history.index_select(1, slot), new))
            self.accepted += (~skip).long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "accepted": self.accepted.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["history"].shape == self.history.shape:
            self.history.copy_(state["history"])
        self.accepted.copy_(state["accepted"])


BAD_BATCH_FORMAT = "adaptivestream-bad-batch/1"


def save_bad_batch(path: Path, batch: dict[str, Any], *, step: int, epoch: int, reason: str, loss: float,
                   grad_norm: float, lr: float, amp: str, model: nn.Module, weights_step: int,
                   cfg: Config) -> None:
    """Write a skipped step's batch for `diagnose_training.py --batch`.

    Keys: format, images [B, 3, H, W] float32 (normalised, as the model saw them), masks [B, H, W] int64,
    labels [B] int64, ids (sample ids or file paths), step, epoch, reason, loss, grad_norm, lr, amp
    (off|bf16|fp16), model (state dict) with weights_step (the step those weights are from: the guard
    decides on the device, so the batch is written at the next log interval, a few steps later), config.
    """
    model = model.module if hasattr(model, "module") else model
    payload = {"format": BAD_BATCH_FORMAT, "images": batch["image"].detach().float().cpu(),
               "masks": torch.as_tensor(batch["mask"]).long().cpu(), "labels": torch.as_tensor(batch["label"]).long().cpu(),
               "ids": [str(i) for i in batch["id"]], "step": step, "epoch": epoch, "reason": reason,
               "loss": loss, "grad_norm": grad_norm, "lr": lr, "amp": amp, "weights_step": weights_step,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": cfg.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_bad_batch(path: str | Path) -> dict[str, Any]:
    """Read a file written by save_bad_batch; raise DataError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"bad-batch file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error: not a bad-batch file
        raise DataError(f"bad-batch file {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != BAD_BATCH_FORMAT:
        raise DataError(f"{path} is not a bad-batch file (no {BAD_BATCH_FORMAT!r} tag)")
    return payload


# ---- Metrics ----
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """[K, K] counts, rows = target, columns = prediction; ignored targets are dropped. Stays on the device."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """IoU, precision, recall, F1 and support per class; NaN where a class is absent from target and prediction."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / (support + predicted - tp), np.nan)
        precision = np.where(present, np.where(predicted > 0, tp / predicted, 0.0), np.nan)
        recall = np.where(present, np.where(support > 0, tp / support, 0.0), np.nan)
        f1 = np.where(present, np.where(precision + recall > 0,
                                        2 * precision * recall / (precision + recall), 0.0), np.nan)
    return {"iou": iou, "precision": precision, "recall": recall, "f1": f1, "support": support}


def summarize(seg_cm: np.ndarray, cls_cm: np.ndarray) -> dict[str, float]:
    """mIoU and macro-F1 over classes present in target or prediction (never NaN), and accuracies."""
    seg, cls = per_class_scores(seg_cm), per_class_scores(cls_cm)

    def mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else 0.0

    return {"miou": mean(seg["iou"]), "pixel_acc": float(np.trace(seg_cm) / max(seg_cm.sum(), 1)),
            "cls_acc": float(np.trace(cls_cm) / max(cls_cm.sum(), 1)), "cls_f1": mean(cls["f1"])}


def format_table(title: str, cm: np.ndarray, names: list[str], score: str) -> str:
    """Per-class table: support, precision, recall, and IoU (segmentation) or F1 (classification)."""
    scores = per_class_scores(cm)
    width = max(8, *(len(n) for n in names))
    lines = [f"{title}", f"  {'class':<{width}} {'support':>10} {'precision':>9} {'recall':>7} {score:>7}"]
    for i, name in enumerate(names):
        def fmt(v: float) -> str:
            return "    -" if np.isnan(v) else f"{v:.3f}"
        lines.append(f"  {name:<{width}} {int(scores['support'][i]):>10} {fmt(scores['precision'][i]):>9} "
                     f"{fmt(scores['recall'][i]):>7} {fmt(scores[score.lower()][i]):>7}")
    return "\n".join(lines)


# ---- Checkpoints ----
class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file. main() exits with code 2."""


CHECKPOINT_FORMAT = "adaptivestream-checkpoint/1"


def nonfinite_tensors(tree: Any, prefix: str = "") -> list[str]:
    """Names of floating tensors in a nested dict/list that hold NaN or Inf, with their counts."""
    bad = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not torch.isfinite(tree).all():
            bad.append(f"{prefix} ({int(torch.isnan(tree).sum())} NaN, {int(torch.isinf(tree).sum())} Inf)")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += nonfinite_tensors(value, f"{prefix}[{i}]")
    return bad


def save_checkpoint(path: Path, payload: dict[str, Any]) -> bool:
    """Write atomically (temp file, fsync, os.replace). Refuse, log and return False if anything is non-finite."""
    bad = nonfinite_tensors({"model": payload["model"], "optimizer": payload.get("optimizer", {})})
    if bad:
        log.error("not writing %s: non-finite tensors %s; the previous file is kept", path, ", ".join(bad[:5]))
        return False
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return True


def load_checkpoint(path: str | Path, cfg: Config | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint; raise CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file: all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                              f"it may be truncated or not a checkpoint of this script") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an AdaptiveStream checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    bad = nonfinite_tensors(payload["model"])
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite weights: {', '.join(bad[:5])}")
    if cfg is not None:
        saved = payload["config"]
        for key in ("num_seg_classes", "num_cls_classes", "backbone", "width", "stream_channels", "decoder_channels"):
            if saved.get(key) != getattr(cfg, key):
                raise CheckpointError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, "
                                      f"but the current config has {key}={getattr(cfg, key)!r}")
    return payload


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)  # as tensors and ints, so weights_only loading accepts it
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- Loop ----
@dataclass
class TrainState:
    """Counters that make up the run's progress; saved in every checkpoint."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps attempted (accepted + skipped)
    best_miou: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, whole run


@dataclass
class Run:
    """Everything a training run holds; built by main(), used by fit()."""

    cfg: Config
    model: nn.Module
    loss_fn: StableLoss
    optimizer: torch.optim.Optimizer
    scheduler: WarmupLRScheduler
    guard: StepGuard | None
    device: torch.device
    train_loader: DataLoader
    val_loader: DataLoader
    run_dir: Path
    scaler: torch.amp.GradScaler | None = None
    state: TrainState = field(default_factory=TrainState)

    def autocast(self):
        if self.cfg.amp == "off":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def to_device(batch: dict[str, Any], run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if run.cfg.channels_last else torch.contiguous_format
    images = batch["image"].to(run.device, non_blocking=True).contiguous(memory_format=memory_format)
    masks = batch["mask"].to(run.device, non_blocking=True).long()  # [B, H, W]
    labels = torch.as_tensor(batch["label"]).to(run.device, non_blocking=True).long()  # [B]
    return images, masks, labels


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One guarded step. Returns [loss, seg, cls, grad_norm, reason, cls_correct] on the device, no host sync.

    With run.guard None the step is unguarded (every update applied): the benchmark's baseline.
    """
    model, optimizer, guard = run.model, run.optimizer, run.guard
    if guard is not None:
        guard.stash_buffers()
    optimizer.zero_grad(set_to_none=True)
    with run.autocast():
        seg_logits, cls_logits = model(images)
    loss, parts = run.loss_fn(seg_logits, cls_logits, masks, labels)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(optimizer)
    else:
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm, foreach=True)  # pre-clip norm
    if guard is None:
        reason = torch.zeros((), dtype=torch.long, device=loss.device)
    else:
        reason = guard.reason(loss.detach(), grad_norm)
        skip = reason != 0
        optimizer.found_inf = skip.float()  # fused optimizers skip the update on the device when this is 1
        optimizer.grad_scale = None
    optimizer.step()
    if run.scaler is not None:
        run.scaler.update()
    if guard is not None:
        guard.commit(skip, loss.detach(), grad_norm)
    run.scheduler.step()
    correct = (cls_logits.detach().argmax(1) == labels).float().sum()
    return torch.stack([loss.detach().float(), parts["seg"], parts["cls"], grad_norm.float(),
                        reason.float(), correct])


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train one epoch; host syncs only every LOG_INTERVAL steps. Raise TrainingFailed on too many skips."""
    cfg, state = run.cfg, run.state
    run.model.train()
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    steps = len(run.train_loader)
    pending: list[torch.Tensor] = []
    totals = {"loss": 0.0, "seg": 0.0, "cls": 0.0, "correct": 0.0, "accepted": 0, "images": 0}
    skipped = 0
    tick, images_since = time.perf_counter(), 0
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None, file=sys.stderr)
    for i, batch in enumerate(run.train_loader):
        images, masks, labels = to_device(batch, run)
        pending.append(train_step(run, images, masks, labels))
        images_since += images.shape[0]
        if len(pending) < cfg.log_interval and i + 1 < steps:
            continue
        rows = torch.stack(pending).cpu().tolist()  # the interval's one host sync
        first_step = state.step
        state.step += len(rows)
        events, lr = [], run.scheduler.get_last_lr()[0]
        for offset, (loss, seg, cls, grad_norm, reason, correct) in enumerate(rows):
            if reason:
                name = SKIP_REASONS[int(reason)]
                skipped += 1
                state.skipped[name] = state.skipped.get(name, 0) + 1
                log.warning("step %d skipped: %s (loss %.4g, grad norm %.4g)", first_step + offset, name, loss, grad_norm)
                events.append({"event": "skip", "step": first_step + offset, "epoch": epoch, "reason": name,
                               "loss": loss, "grad_norm": grad_norm})
            else:
                totals["loss"] += loss * images.shape[0]
                totals["seg"] += seg * images.shape[0]
                totals["cls"] += cls * images.shape[0]
                totals["correct"] += correct
                totals["accepted"] += 1
                totals["images"] += images.shape[0]
        elapsed = time.perf_counter() - tick
        last = rows[-1]
        record = {"event": "log", "step": state.step, "epoch": epoch, "loss": last[0], "seg_loss": last[1],
                  "cls_loss": last[2], "grad_norm": last[3], "lr": lr, "skipped_epoch": skipped,
                  "images_per_s": images_since / max(elapsed, 1e-9)}
        _append_jsonl(run.run_dir / "steps.jsonl", events + [record])
        bar.set_postfix(loss=f"{last[0]:.3f}", lr=f"{lr:.2e}", gnorm=f"{last[3]:.2f}", skipped=skipped)
        bar.update(len(rows))
        pending, tick, images_since = [], time.perf_counter(), 0
        if skipped > cfg.max_skip_fraction * steps:
            bar.close()
            raise TrainingFailed(
                f"{skipped} of {steps} steps in epoch {epoch + 1} were skipped (more than max_skip_fraction="
                f"{cfg.max_skip_fraction}); reasons so far: {state.skipped}. Training is not learning: "
                f"run diagnose_training.py with the same flags, and see {run.run_dir / 'steps.jsonl'}")
    bar.close()
    n = max(totals["images"], 1)
    return {"train_loss": totals["loss"] / n if totals["accepted"] else float("nan"),
            "train_seg_loss": totals["seg"] / n if totals["accepted"] else float("nan"),
            "train_cls_loss": totals["cls"] / n if totals["accepted"] else float("nan"),
            "train_cls_acc": totals["correct"] / n, "skipped_steps": skipped}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: StableLoss, cfg: Config, device: torch.device,
             autocast=nullcontext) -> dict[str, Any]:
    """Loss and confusion matrices over the loader, reduced once at the end (all-reduced under torchrun)."""
    model.eval()
    seg_cm = torch.zeros(cfg.num_seg_classes, cfg.num_seg_classes, dtype=torch.long, device=device)
    cls_cm = torch.zeros(cfg.num_cls_classes, cfg.num_cls_classes, dtype=torch.long, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, seg, cls (x images), images
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        labels = torch.as_tensor(batch["label"]).to(device).long()
        with autocast():
            seg_logits, cls_logits = model(images)
        loss, parts = loss_fn(seg_logits, cls_logits, masks, labels)
        n = images.shape[0]
        sums += torch.stack([loss.detach() * n, parts["seg"] * n, parts["cls"] * n,
                             torch.tensor(n, device=device)]).double()
        seg_cm += confusion_matrix(seg_logits.argmax(1), masks, cfg.num_seg_classes, cfg.ignore_index)
        cls_cm += confusion_matrix(cls_logits.argmax(1), labels, cfg.num_cls_classes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (seg_cm, cls_cm, sums):
            torch.distributed.all_reduce(tensor)
    seg_np, cls_np, sums_np = seg_cm.cpu().numpy(), cls_cm.cpu().numpy(), sums.cpu().numpy()
    n = max(sums_np[3], 1)
    result: dict[str, Any] = {"val_loss": sums_np[0] / n, "val_seg_loss": sums_np[1] / n,
                              "val_cls_loss": sums_np[2] / n}
    result.update({f"val_{k}": v for k, v in summarize(seg_np, cls_np).items()})
    result["seg_cm"], result["cls_cm"] = seg_np, cls_np
    return result


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, batches: int, device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics as plain averages over `batches` training batches.

    The fix for stale or poisoned running stats (eval-mode accuracy far below train-mode accuracy):
    momentum=None makes BatchNorm keep a cumulative average, so every batch counts equally.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        model(batch["image"].to(device, non_blocking=True))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_seg_loss", "train_cls_loss", "train_cls_acc", "skipped_steps",
                  "val_loss", "val_seg_loss", "val_cls_loss", "val_miou", "val_pixel_acc", "val_cls_acc",
                  "val_cls_f1", "seconds"]


def write_metrics_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def checkpoint_payload(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    model = run.model.module if hasattr(run.model, "module") else run.model
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "guard": run.guard.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "state": asdict(run.state), "config": cfg.to_dict(), "rng": rng_state(),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "class_names": class_names(cfg)}


def restore(run: Run, payload: dict[str, Any]) -> None:
    """Put a run back where a checkpoint left it."""
    model = run.model.module if hasattr(run.model, "module") else run.model
    model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    run.scheduler.load_state_dict(payload["scheduler"])
    run.guard.load_state_dict(payload["guard"])
    if run.scaler is not None and payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    run.state = TrainState(**payload["state"])
    set_rng_state(payload["rng"])


def fit(run: Run) -> dict[str, Any]:
    """Epochs of train_one_epoch + evaluate, metrics.csv, last/best checkpoints, early stopping."""
    cfg, state = run.cfg, run.state
    names = class_names(cfg)
    result: dict[str, Any] = {}
    for epoch in range(state.epoch, cfg.epochs):
        start = time.perf_counter()
        train = train_one_epoch(run, epoch)
        if cfg.bn_recalibrate > 0:
            recalibrate_bn(run.model, run.train_loader, cfg.bn_recalibrate, run.device)
        val = evaluate(run.model, run.val_loader, run.loss_fn, cfg, run.device, run.autocast)
        state.epoch = epoch + 1
        row = {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[0], **train,
               **{k: v for k, v in val.items() if not k.endswith("_cm")}, "seconds": time.perf_counter() - start}
        improved = val["val_miou"] > state.best_miou
        if improved:
            state.best_miou, state.best_epoch, state.epochs_since_best = val["val_miou"], epoch + 1, 0
        else:
            state.epochs_since_best += 1
        write_metrics_row(run.run_dir / "metrics.csv", row)
        log.info("epoch %d/%d  loss %.4f (seg %.4f cls %.4f)  val loss %.4f  mIoU %.4f  pixel acc %.4f  "
                 "cls acc %.4f (train-mode %.4f)  F1 %.4f  skipped %d  lr %.2e  %.1fs%s",
                 epoch + 1, cfg.epochs, row["train_loss"], row["train_seg_loss"], row["train_cls_loss"],
                 row["val_loss"], row["val_miou"], row["val_pixel_acc"], row["val_cls_acc"], row["train_cls_acc"],
                 row["val_cls_f1"], row["skipped_steps"], row["lr"], row["seconds"], "  *best*" if improved else "")
        log.info("%s\n%s", format_table("segmentation (val)", val["seg_cm"], names["seg"], "IoU"),
                 format_table("classification (val)", val["cls_cm"], names["cls"], "F1"))
        payload = checkpoint_payload(run)
        save_checkpoint(run.run_dir / "last.pt", payload)
        if improved:
            save_checkpoint(run.run_dir / "best.pt", payload)
        result = row
        if state.epochs_since_best >= cfg.patience:
            log.info("early stop: no better val mIoU for %d epochs (best %.4f at epoch %d)",
                     cfg.patience, state.best_miou, state.best_epoch)
            break
    return result


# ---- main ----
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(cfg: Config, run_dir: Path) -> Run:
    """Data, model, loss, optimizer, schedule and guard for cfg, on its device."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_ds, val_ds = build_datasets(cfg)
    resolve_data_settings(cfg, train_ds)
    report_data(cfg, train_ds, val_ds, run_dir)
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds, device)
    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    return Run(cfg=cfg, model=model, loss_fn=build_loss(cfg).to(device), optimizer=optimizer, scheduler=scheduler,
               guard=StepGuard(model, cfg, device), device=device, train_loader=train_loader,
               val_loader=val_loader, run_dir=run_dir, scaler=scaler)


def main(argv: list[str] | None = None) -> int:
    handlers: list[logging.Handler] = []
    try:
        cfg = load_config(argv, prog="train_enhanced_adaptivestream.py")
        run_dir = Path(cfg.out_dir or time.strftime("runs/%Y%m%d-%H%M%S"))
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.out_dir = str(run_dir)
        handlers = setup_logging(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("resolved config (also in %s):\n%s", run_dir / "config.yaml",
                 yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        run = build_run(cfg, run_dir)
        if cfg.resume:
            restore(run, load_checkpoint(cfg.resume, cfg))
            log.info("resumed from %s at epoch %d, step %d", cfg.resume, run.state.epoch, run.state.step)
        params = sum(p.numel() for p in run.model.parameters())
        log.info("device %s | %s backbone | %.2fM parameters | %d train / %d val images | %d steps per epoch",
                 run.device, cfg.backbone, params / 1e6, len(run.train_loader.dataset), len(run.val_loader.dataset),
                 len(run.train_loader))
        result = fit(run)
        skipped = sum(run.state.skipped.values())
        log.info("done: best val mIoU %.4f at epoch %d; last val cls acc %.4f; %d skipped steps %s; run folder %s",
                 run.state.best_miou, run.state.best_epoch, result.get("val_cls_acc", float("nan")), skipped,
                 run.state.skipped or "", run_dir)
        return 0
    except (ConfigError, DataError, CheckpointError) as err:
        (log.error if handlers else lambda m, e: print(m % e, file=sys.stderr))("error: %s", err)
        return 2
    except TrainingFailed as err:
        log.error("training failed: %s", err)
        return 1
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
