"""Data for train_enhanced_adaptivestream.py: datasets, joint image/mask transforms, start-up checks, loaders.

Three datasets yield the same sample dict (uint8-derived float image [3, H, W], integer mask [H, W],
label, id): synthetic shapes (generated, deterministic from the seed), a folder of images + masks +
labels, and Oxford-IIIT Pet through torchvision. File datasets are read once at start-up, so a bad
file stops the run before its first step with a DataError that names the file.

This module imports nothing from the training script.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
import torch.utils.data.distributed
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import OxfordIIITPet
from torchvision.transforms import v2

from config import Config, color_map_table

log = logging.getLogger("adaptivestream")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What PIL raises for a missing, truncated or foreign file (SyntaxError: some plugins' "broken PNG").
_PIL_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
IGNORE_MAX_FRACTION = 0.5  # a mask with more of its pixels at ignore_index: warn (probably mis-encoded)
DOMINANT_CLASS_FRACTION = 0.95  # one class holding more of the pixels or labels: warn (a constant guess scores well)
SYNTHETIC_STATS_SAMPLE = 64  # synthetic images the start-up summary counts (file datasets: all of them)


class DataError(ValueError):
    """Bad input data; the message names the file. main() exits with code 2."""


def _render_shapes(rng: np.random.Generator, size: int, num_seg_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic sample: uint8 image [H, W, 3] and uint8 mask [H, W] of shape classes (0 = background)."""
    # Row and column coordinates as a column and a row: every per-pixel expression below broadcasts
    # them to [H, W], the same values as full coordinate grids at a fraction of the arithmetic.
    coords = np.arange(size).astype(np.float32) / size
    yy, xx = coords[:, None], coords[None, :]
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
    image += rng.normal(0, 0.06, image.shape)
    np.clip(image, 0, 1, out=image)
    image *= 255
    return image.astype(np.uint8), mask


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

    An epoch is `size` images; the dataset holds `sets` such sets, and index i of set k is sample
    k * size + i (set 0 is samples 0..size-1). ResumableSampler draws epoch e from set e mod sets:
    a fixed set of 768 images is memorised by the cls head, more distinct ones are not (docs/results.md).
    """

    def __init__(self, size: int, image_size: int, num_seg_classes: int, num_cls_classes: int,
                 seed: int, split: str, transform: v2.Transform | None = None, sets: int = 1):
        self.size, self.sets, self.image_size, self.transform = size, sets, image_size, transform
        self.num_seg_classes, self.num_cls_classes = num_seg_classes, num_cls_classes
        self.seed, self.split = seed, split
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def __len__(self) -> int:
        return self.size  # one epoch; samples size..sets*size-1 are the other sets

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Untransformed uint8 image [3, H, W], uint8 mask [H, W], label."""
        if not 0 <= index < self.size * self.sets:
            raise IndexError(f"synthetic {self.split} sample {index} out of range: {self.sets} set(s) of {self.size}")
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


def invalid_mask_values(values: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """The mask values that are neither a class index in [0, num_classes) nor ignore_index (a float that is
    not a whole number is never valid)."""
    values = np.asarray(values)
    whole = values == np.floor(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
    valid = (whole & (values >= 0) & (values < num_classes)) | (values == ignore_index)
    return values[~valid]


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
        inside = (values >= 0) & (values < len(self.pixel_counts))  # not a negative ignore_index
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


def image_files(folder: Path, clash: str) -> list[Path]:
    """The image files directly inside folder (by IMAGE_EXTENSIONS, hidden files left out), sorted.

    Raise DataError when two share a stem (a.jpg, a.png): `clash` says what would go wrong.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith("."))
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise DataError(f"{stems[path.stem]} and {path} have the same stem: {clash}")
        stems[path.stem] = path
    return files


def list_folder(cfg: Config) -> list[FolderRecord]:
    """Every image of DATA_ROOT/images with its mask path and label (bad ones carry their problem)."""
    root = Path(cfg.data_root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder: a folder dataset needs images/ and masks/ under "
                            f"{root} (see docs/data.md)")
    files = image_files(images_dir, "their masks would be the same file")
    if not files:
        raise DataError(f"{images_dir} holds no images ({' '.join(IMAGE_EXTENSIONS)}): the dataset is empty")
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


def pet_archives() -> list[str]:
    """The archive names torchvision's OxfordIIITPet downloads (and finds, verified, in DATA_ROOT/oxford-iiit-pet)."""
    return [url.rsplit("/", 1)[1] for url, _ in OxfordIIITPet._RESOURCES]


def pet_by_hand(base: Path) -> str:
    """How to install Oxford-IIIT Pet without this machine downloading it."""
    first, second = pet_archives()
    return (f"By hand: fetch {first} and {second} from https://www.robots.ox.ac.uk/~vgg/data/pets/, put both in "
            f"{base}/ and run again with --download (it checks them and unpacks them there, no network needed), "
            f"or unpack them yourself (tar -xzf {first} -C {base}) so that {base}/images/ and "
            f"{base}/annotations/ exist.")


def _paths_before(base: Path) -> tuple[Path | None, set[Path]]:
    """(the highest missing folder on the way to base, what base holds): what a failed download must undo."""
    missing = next((p for p in reversed([base, *base.parents]) if not p.exists()), None)
    return missing, set(base.iterdir()) if base.is_dir() else set()


def _remove_new(base: Path, before: tuple[Path | None, set[Path]]) -> str:
    """Remove what a failed download made (folders it created, partial archives; never a file that was
    there before) and say what, for the error message: "; removed ..." or ""."""
    missing, existing = before
    new = ([missing] if missing is not None and missing.exists() else
           sorted(set(base.iterdir()) - existing) if base.is_dir() else [])
    for path in new:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return f"; removed what the failed download made: {', '.join(map(str, new))}" if new else ""


class OxfordPetDataset(FileDataset):
    """Oxford-IIIT Pet through torchvision.datasets.OxfordIIITPet; trimaps become background / pet / ignore."""

    label_source = "the Oxford-IIIT Pet annotation list"

    def __init__(self, cfg: Config, split: str, transform: v2.Transform | None):
        root = Path(cfg.data_root)
        target = "category" if cfg.pet_target == "breed" else "binary-category"
        base = root / "oxford-iiit-pet"
        before = _paths_before(base)
        try:
            self.pet = OxfordIIITPet(root, split="trainval" if split == "train" else "test",
                                     target_types=[target, "segmentation"], download=cfg.download)
        except (URLError, ConnectionError, TimeoutError) as err:  # DNS failure, no route, refused, timed out
            raise DataError(f"{base}: --download could not reach the dataset's server: no network? "
                            f"({type(err).__name__}: {getattr(err, 'reason', err)}){_remove_new(base, before)}. "
                            f"{pet_by_hand(base)}") from None
        except RuntimeError as err:  # torchvision: "Dataset not found" (no download) or a corrupt archive
            if cfg.download:
                raise DataError(f"{base}: the downloaded archives are incomplete or corrupt ({err})"
                                f"{_remove_new(base, before)}. {pet_by_hand(base)}") from None
            if all((base / name).is_file() for name in pet_archives()):
                raise DataError(f"{base}: the archives {' and '.join(pet_archives())} are there but not unpacked: "
                                f"run again with --download (it checks and unpacks them, no network needed)") from None
            raise DataError(f"{base}: the Oxford-IIIT Pet dataset is not there (images/ and annotations/ are "
                            f"missing). {pet_by_hand(base)} With network access, --download fetches them "
                            f"instead.") from None
        except (OSError, ValueError) as err:  # missing or malformed annotation list, disk full while unpacking
            undone = _remove_new(base, before) if cfg.download else ""
            raise DataError(f"{base}: cannot read the dataset ({type(err).__name__}: {err}){undone}") from None
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
    outside = invalid_mask_values(values, cfg.num_seg_classes, cfg.ignore_index)
    if len(outside):
        hint = " (masks look like 0/255: set mask_scale or ignore_index)" if values.tolist() == [0, 255] else ""
        return (f"{ds.mask_path(i)}: mask values {outside[:8].tolist()} are outside [0, {cfg.num_seg_classes}) "
                f"and not ignore_index {cfg.ignore_index}{hint}"), None, None, -1
    if not 0 <= label < cfg.num_cls_classes:
        return (f"{ds.path(i)}: label {label} (from {ds.label_source}) is outside [0, {cfg.num_cls_classes}): "
                f"fix the label or num_cls_classes"), None, None, -1
    return None, values, counts, label


@dataclass
class ScanResult:
    """What reading every sample of one split found."""

    bad: list[tuple[int, str]]  # (index, message) of samples that cannot be used
    only_ignore: list[str]  # masks whose only non-background value is ignore_index
    mostly_ignore: list[str]  # masks with more than IGNORE_MAX_FRACTION of their pixels at ignore_index


def scan_dataset(ds: FileDataset, cfg: Config) -> ScanResult:
    """Read every sample of ds once (threads: PIL decodes without the GIL) and set ds.stats."""
    stats, found = DataStats.empty(cfg), ScanResult([], [], [])
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda i: _check_one(ds, cfg, i), range(ds.count()))
        for i, (problem, values, counts, label) in enumerate(results):
            if problem is not None:
                found.bad.append((i, problem))
                continue
            stats.add(values, counts, label, cfg.ignore_index)
            if values[values != 0].tolist() == [cfg.ignore_index]:
                found.only_ignore.append(ds.mask_path(i))
            if counts[values == cfg.ignore_index].sum() > IGNORE_MAX_FRACTION * counts.sum():
                found.mostly_ignore.append(ds.mask_path(i))
    ds.stats = stats
    return found


def warn_ignored_masks(cfg: Config, found: list[ScanResult], class_pixels: int) -> None:
    """WARN about masks that are probably encoded differently from the rest (the run goes on)."""
    only = [path for f in found for path in f.only_ignore]
    mostly = [path for f in found for path in f.mostly_ignore]
    if only and class_pixels:
        log.warning("%d mask(s) hold only background and ignore_index %d while the others hold class values, e.g. "
                    "%s: probably binary masks saved as 0/%d among 0/1 masks; their objects are never scored. Re-save "
                    "them with class indices (mask // %d)", len(only), cfg.ignore_index, ", ".join(only[:3]),
                    cfg.ignore_index, cfg.ignore_index)
    if mostly:
        log.warning("%d mask(s) are more than %d%% ignore_index %d, e.g. %s: those pixels are never scored; check "
                    "the mask encoding (or set ignore_index)", len(mostly), 100 * IGNORE_MAX_FRACTION,
                    cfg.ignore_index, ", ".join(mostly[:3]))


def check_datasets(cfg: Config, train: FileDataset, val: FileDataset) -> None:
    """Read every image, mask and label once; raise DataError listing every bad file, or drop the bad samples.

    Checks: the image decodes (truncated and foreign files fail), the mask exists, is a PNG with one channel
    (or colours in color_map), has the image's size and only values in [0, NUM_SEG_CLASSES) or IGNORE_INDEX;
    the label exists and is in [0, NUM_CLS_CLASSES).
    """
    start = time.perf_counter()
    found = {ds.split: scan_dataset(ds, cfg) for ds in (train, val)}
    only_ignore = [path for f in found.values() for path in f.only_ignore]
    class_pixels = sum(int(ds.stats.pixel_counts[1:].sum()) for ds in (train, val))
    if only_ignore and class_pixels == 0 and cfg.ignore_index == 255:
        raise DataError(f"every mask holds only 0 and 255 (e.g. {', '.join(only_ignore[:3])}), and 255 is "
                        f"ignore_index: nothing but background would be learned (masks look like 0/255: set "
                        f"mask_scale or ignore_index). mask_scale: 255 reads them as classes 0/1")
    warn_ignored_masks(cfg, list(found.values()), class_pixels)
    problems = [message for f in found.values() for _, message in f.bad]
    if problems and not cfg.skip_bad_samples:
        raise DataError(f"{len(problems)} bad sample(s) found at start-up; nothing was trained. Fix or remove them, "
                        f"or pass --skip-bad-samples to train without them:\n  " + "\n  ".join(sorted(problems)))
    for ds in (train, val):
        dropped = {i for i, _ in found[ds.split].bad}
        ds.keep = [i for i in range(ds.count()) if i not in dropped]
        ds.bad = sorted(message for _, message in found[ds.split].bad)
        if not ds.keep:
            raise DataError(f"the {ds.split} split is empty: all {ds.count()} of its samples are bad, e.g. {ds.bad[0]}")
    dropped = len(problems)
    log.info("checked %d samples in %.1fs: %s", train.count() + val.count(), time.perf_counter() - start,
             f"{dropped} bad sample(s) dropped (--skip-bad-samples), listed in bad_samples.txt; the rest are good"
             if dropped else "every image decoded; every mask read (PNG, one channel or color_map, image's size, "
             "values); every label in range")


class _ExactMaskResampling:
    """Masks resampled with NEAREST_EXACT (pixel centres, as the image's bilinear resize samples them).

    v2 resizes a tv_tensors.Mask with legacy NEAREST (floor), which shifts a downscaled mask up to half an
    output pixel towards the top-left of its image: at 39 -> 32 px, 8% of block-mask pixels disagreed with
    the thresholded image, against 0.1% with NEAREST_EXACT.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Mask):
            parent = super()
            return (parent.transform if hasattr(parent, "transform") else parent._transform)(inpt, params)
        if "height" in params:  # RandomResizedCrop: crop the same box first
            inpt = v2.functional.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        return v2.functional.resize(inpt, self.size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
                                    max_size=getattr(self, "max_size", None))

    _transform = transform  # the name torchvision 0.20 calls (0.21 renamed it to transform)


class MaskAlignedResize(_ExactMaskResampling, v2.Resize):
    pass


class MaskAlignedRandomResizedCrop(_ExactMaskResampling, v2.RandomResizedCrop):
    pass


def augmentation(cfg: Config) -> dict[str, float]:
    """The training augmentation that applies, by step: crop (minimum area of the random resized crop),
    flip (probability), jitter (brightness/contrast/saturation strength); a step at its identity value is
    left out. Synthetic shapes are rendered at image_size and only flip: the label is the shape with the
    most visible pixels, which a crop could cut away."""
    if not cfg.augment:
        return {}
    steps = {"crop": cfg.crop_scale if cfg.crop_scale < 1 else 0, "flip": cfg.hflip, "jitter": cfg.color_jitter}
    if cfg.dataset == "synthetic":
        steps["crop"] = steps["jitter"] = 0
    return {name: value for name, value in steps.items() if value > 0}


def build_transforms(cfg: Config, train: bool) -> v2.Transform:
    """Joint image/mask transforms: v2 resamples a tv_tensors.Mask with nearest, and colour ops skip it.

    Training: the steps of augmentation(cfg); without a crop (and for validation) the deterministic resize
    (+ centre crop) below.
    """
    size, use = cfg.image_size, augmentation(cfg) if train else {}
    if cfg.dataset == "synthetic":
        steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
    elif "crop" in use:
        steps = [MaskAlignedRandomResizedCrop(size, scale=(use["crop"], 1.0), antialias=True)]
    else:
        steps = [MaskAlignedResize(size, antialias=True), v2.CenterCrop(size)]  # shorter side to size, then centre
    if "flip" in use:
        steps.append(v2.RandomHorizontalFlip(p=use["flip"]))
    if "jitter" in use:
        jitter = use["jitter"]
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))  # hue: 10x slower
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def describe_augmentation(cfg: Config) -> str:
    """One line for the start-up log: the training augmentation in use, and the settings that do not apply."""
    if not cfg.augment:
        return "augmentation: off (--no-augment): training images are resized and centre-cropped like validation"
    use = augmentation(cfg)
    parts = [f"random resized crop {use['crop']:g}-1 of the area" if "crop" in use else "no crop",
             f"horizontal flip p={use['flip']:g}" if "flip" in use else "no flip",
             f"colour jitter {use['jitter']:g}" if "jitter" in use else "no colour jitter"]
    note = (" (synthetic: crop_scale and color_jitter do not apply; a crop could cut away the shape that sets "
            "the label)" if cfg.dataset == "synthetic" else "")
    return "augmentation: " + ", ".join(parts) + note


def class_names(cfg: Config) -> dict[str, list[str]]:
    return {"seg": cfg.seg_class_names or [f"seg{i}" for i in range(cfg.num_seg_classes)],
            "cls": cfg.cls_class_names or [f"cls{i}" for i in range(cfg.num_cls_classes)]}


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for cfg.dataset; raise DataError naming the file on bad data."""
    log.info(describe_augmentation(cfg))
    if cfg.dataset == "synthetic":
        log.info("synthetic data: %d training images an epoch, epoch e from set e mod %d (%d distinct images); "
                 "%d val", cfg.synthetic_train_size, cfg.synthetic_train_sets,
                 cfg.synthetic_train_size * cfg.synthetic_train_sets, cfg.synthetic_val_size)
        common = dict(image_size=cfg.image_size, num_seg_classes=cfg.num_seg_classes,
                      num_cls_classes=cfg.num_cls_classes, seed=cfg.seed)
        return (SyntheticShapes(cfg.synthetic_train_size, split="train", sets=cfg.synthetic_train_sets,
                                transform=build_transforms(cfg, train=True), **common),
                SyntheticShapes(cfg.synthetic_val_size, split="val",
                                transform=build_transforms(cfg, train=False), **common))
    train, val = build_folder_datasets(cfg) if cfg.dataset == "folder" else build_pet_datasets(cfg)
    check_datasets(cfg, train, val)
    return train, val


def dataset_stats(ds: Dataset, cfg: Config, sample: int | None = SYNTHETIC_STATS_SAMPLE) -> tuple[DataStats, str]:
    """Class frequencies of ds and what they cover: the start-up scan of a file dataset, or `sample` evenly
    spaced synthetic images (None: all of them)."""
    if isinstance(ds, FileDataset):
        return ds.stats, f"all {ds.stats.images} images"
    stats = DataStats.empty(cfg)
    sample = len(ds) if sample is None else sample
    step = max(1, len(ds) // sample)
    for i in range(0, len(ds), step)[:sample]:
        _, mask, label = ds.sample(i)
        stats.add(*value_counts(mask.numpy()), label, cfg.ignore_index)
    return stats, f"{stats.images} of {len(ds)} images"


@dataclass
class Baselines:
    """What a model that learned nothing scores on this data: the bar a trained model must clear.

    cls: chance (1/C) and the val accuracy of always predicting the most frequent training label.
    seg: the val mIoU and pixel accuracy of predicting the most frequent training pixel class everywhere.
    Uniform-guess losses: cross-entropy of equal logits, ln(classes) per head (class weights and label
    smoothing leave it unchanged: every target then costs ln(classes)), plus for seg dice_weight x the soft
    Dice of that guess on the val pixel frequencies (uniform_dice), and their weighted total.
    """

    cls_chance: float
    cls_majority: float
    seg_majority_miou: float
    seg_majority_pixel_acc: float
    seg_uniform_loss: float
    cls_uniform_loss: float
    uniform_loss: float
    val_images: int = 0  # how many images the val metrics average over (their noise)

    def cls_baseline(self) -> float:
        return max(self.cls_chance, self.cls_majority)


def majority_scores(val_counts: np.ndarray) -> tuple[float, float]:
    """(mIoU, accuracy) on val of the best constant guess, its most frequent class everywhere, with mIoU over
    the classes present in the target or the prediction (as the training metrics count it). The best constant
    is the bar: a model that learned nothing may settle on any one class (a diverged one picks one)."""
    top, total = int(val_counts.argmax()), max(int(val_counts.sum()), 1)
    accuracy = float(val_counts[top]) / total
    return accuracy / max(int((val_counts > 0).sum()), 1), accuracy


def uniform_dice(pixel_counts: np.ndarray) -> float:
    """The soft Dice loss (StableLoss) of equal logits: every pixel gives each of the S classes 1/S, so a
    class of n_c of the N pixels scores 1 - 2 (n_c / S) / (N / S + n_c); the mean over the classes present.
    Exact for one batch with these counts, and for the val loss, which scores the Dice over the whole split;
    the train loss averages it per batch (a class absent from a batch is left out there, and batches vary):
    on the default synthetic val split 0.839 against 0.841 averaged over its batches of 8 (0.816 over
    batches of 2), close enough for the verdict's "train loss below a uniform guess"."""
    counts = np.asarray(pixel_counts, np.float64)
    present = counts[counts > 0]
    if not len(present):
        return 0.0
    return float(np.mean(1 - 2 * present / (counts.sum() + len(counts) * present)))


def data_baselines(cfg: Config, train_ds: Dataset, val_ds: Dataset) -> Baselines:
    """Baselines over the whole val split (synthetic: every image is rendered, about 1 s for 192 at 224 px)."""
    val, _ = dataset_stats(val_ds, cfg, sample=None)
    seg_miou, seg_acc = majority_scores(val.pixel_counts)
    _, cls_acc = majority_scores(val.label_counts)
    seg_loss = math.log(cfg.num_seg_classes) + cfg.dice_weight * uniform_dice(val.pixel_counts)
    cls_loss = math.log(cfg.num_cls_classes)
    return Baselines(cls_chance=1 / cfg.num_cls_classes, cls_majority=cls_acc, seg_majority_miou=seg_miou,
                     seg_majority_pixel_acc=seg_acc, seg_uniform_loss=seg_loss, cls_uniform_loss=cls_loss,
                     uniform_loss=cfg.seg_weight * seg_loss + cfg.cls_weight * cls_loss, val_images=len(val_ds))


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


def report_data(cfg: Config, train_ds: Dataset, val_ds: Dataset, run_dir: Path, baselines: Baselines) -> None:
    """Log the one-screen data summary, baselines and imbalance warnings; write the split and dropped samples."""
    names = class_names(cfg)
    stats, covers = dataset_stats(train_ds, cfg)
    b = baselines
    lines = [f"data: {getattr(train_ds, 'description', '') or cfg.dataset} | {len(train_ds)} train, "
             f"{len(val_ds)} val images",
             f"  image labels (train, {covers}): {_format_counts(stats.label_counts, names['cls'])}",
             f"  mask pixels (train, {covers}): {_format_counts(stats.pixel_counts, names['seg'])}; "
             f"{stats.ignored_pixels} ignored",
             f"  baselines (val, a model that learned nothing): cls acc {b.cls_baseline():.4f} (chance "
             f"{b.cls_chance:.4f}, majority {b.cls_majority:.4f}); mIoU {b.seg_majority_miou:.4f} (majority class "
             f"everywhere, pixel acc {b.seg_majority_pixel_acc:.4f}); uniform-guess loss {b.uniform_loss:.4f} "
             f"(seg {b.seg_uniform_loss:.4f}, cls {b.cls_uniform_loss:.4f})"]
    log.info("\n".join(lines))
    for counts, head, what in ((stats.pixel_counts, "seg", "mask pixels"), (stats.label_counts, "cls", "image labels")):
        top = int(counts.argmax())
        share = counts[top] / max(counts.sum(), 1)
        if share > DOMINANT_CLASS_FRACTION and getattr(cfg, f"{head}_class_weights") is None:
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


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler (order a pure function of seed and epoch, sharded by rank) that can start
    mid-epoch: set_epoch(epoch, start_batch) skips the batches a resumed run already trained on.
    Over a dataset of `sets` sets (SyntheticShapes) epoch e draws its len(dataset) indices from set e mod sets."""

    def __init__(self, dataset: Dataset, batch_size: int, sets: int = 1, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.sets, self.start = batch_size, sets, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        offset = (self.epoch % self.sets) * len(self.dataset)
        return iter([offset + i for i in list(super().__iter__())[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loaders(cfg: Config, train_ds: Dataset, val_ds: Dataset, device: torch.device,
                  rank: int = 0, world_size: int = 1) -> tuple[DataLoader, DataLoader]:
    """Seeded loaders (same batches on every run), sharded by rank under torchrun.

    Validation shards are strided without padding, so no image is counted twice when the
    confusion matrices of all ranks are summed.
    """
    if len(train_ds) < cfg.batch_size * world_size:
        raise DataError(f"training set has {len(train_ds)} images, fewer than one batch "
                        f"({cfg.batch_size} x {world_size} processes): lower --batch-size")
    # SEED + rank: the generator seeds the DataLoader workers, whose augmentation must differ per rank.
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, worker_init_fn=_seed_worker,
                  pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    sets = train_ds.sets if isinstance(train_ds, SyntheticShapes) else 1
    train_sampler = ResumableSampler(train_ds, cfg.batch_size, sets=sets, num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
    train = DataLoader(train_ds, sampler=train_sampler, drop_last=True, generator=generator, **common)
    val = DataLoader(torch.utils.data.Subset(val_ds, range(rank, len(val_ds), world_size)), shuffle=False, **common)
    return train, val
