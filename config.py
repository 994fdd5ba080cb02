"""Defaults for train_enhanced_adaptivestream.py, and the one way to override them.

Every setting is an annotated UPPER_CASE constant below with a one-line comment.
Precedence: these defaults < ``--config file.yaml`` (lower-case keys) < command-line
flags (the same name with dashes): ``BASE_LR`` is ``base_lr:`` in YAML and ``--base-lr``
on the command line. Unknown keys, wrong types and out-of-range values stop with a
message that names the key (and the closest valid name for a typo).

    python config.py            # print the defaults as YAML
    python config.py --markdown # the table of docs/configuration.md
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# ---- Data ----
DATASET: str = "synthetic"  # synthetic | folder | oxford_pet
DATA_ROOT: str | None = None  # dataset folder (folder, oxford_pet); unused by synthetic
IMAGE_SIZE: int = 224  # side of the square training crop, pixels
NUM_SEG_CLASSES: int = 4  # segmentation classes, background included
NUM_CLS_CLASSES: int = 3  # image-level classes
SEG_CLASS_NAMES: list[str] | None = None  # names for the per-class table (default: seg0, seg1, ...; oxford_pet: background, pet)
CLS_CLASS_NAMES: list[str] | None = None  # names for the per-class table (default: cls0, cls1, ...; oxford_pet: breeds); labels.csv may use them
MASK_SUFFIX: str = ""  # folder: the mask of images/<stem>.jpg is masks/<stem><MASK_SUFFIX>.png (UTKFace-style: _mask)
MASK_SCALE: int = 1  # folder: mask values are divided by this (255 reads 0/255 masks as classes 0/1)
COLOR_MAP: dict[str, int | str] | None = None  # folder, RGB masks: colour -> class, e.g. {"0,0,0": 0, "#ff0000": 1} (YAML)
LABEL_REGEX: str | None = None  # folder: image labels from this regex on the file name (first group) instead of labels.csv
VAL_FRACTION: float = 0.2  # folder without splits/*.txt: share of images for validation, chosen by file-name hash
SKIP_BAD_SAMPLES: bool = False  # drop the bad samples found at start-up (listed in the run folder) instead of stopping
PET_TARGET: str = "breed"  # oxford_pet image label: breed (37 classes) | species (2: cat, dog)
DOWNLOAD: bool = False  # oxford_pet: let torchvision download the dataset into DATA_ROOT (needs internet)
SYNTHETIC_TRAIN_SIZE: int = 768  # synthetic training images per epoch (each a pure function of SEED and its index)
SYNTHETIC_TRAIN_SETS: int = 4  # synthetic: epoch e trains on set e mod this of SYNTHETIC_TRAIN_SIZE images (4: 3,072 distinct); 1 = the same images every epoch
SYNTHETIC_VAL_SIZE: int = 192  # synthetic validation images
NUM_WORKERS: int = 0  # DataLoader worker processes (0 = load in the training process)
AUGMENT: bool = True  # random training augmentation below; --no-augment: resize + centre crop, as validation
HFLIP: float = 0.0  # probability of a horizontal flip (image and mask); 0.5 only where a mirror image keeps its class (docs/data.md)
CROP_SCALE: float = 0.8  # folder, oxford_pet: least area fraction of the random resized crop (1 = no crop: resize + centre crop)
COLOR_JITTER: float = 0.2  # folder, oxford_pet: brightness/contrast/saturation jitter strength (0 = off; image only)

# ---- Model ----
BACKBONE: str = "adaptivestream"  # adaptivestream (built-in, fast) | resnet18 | resnet34 | resnet50 | mobilenet_v3_large
PRETRAINED: bool = False  # load torchvision's ImageNet weights for a torchvision backbone
WIDTH: int = 16  # channels at stride 2 of the built-in encoder; doubles (roughly) per stride
STEM_KERNEL: int = 7  # side of the built-in encoder's stride-2 stem conv, odd (3 before; why 7: docs/results.md)
STREAM_CHANNELS: int = 128  # channels of the 1x1 stream projection at stride 32
DECODER_CHANNELS: int = 16  # channels of the last (full-resolution) decoder stage; doubles per stride up
CLS_POOL: str = "avgmax"  # the cls head reads each pooled level's mean (avg) or its mean and max (avgmax; avg before; why: docs/results.md)

# ---- Loss ----
SEG_WEIGHT: float = 1.0  # weight of the segmentation loss (cross-entropy + dice_weight x soft Dice)
DICE_WEIGHT: float = 3.0  # weight of the soft Dice term beside the segmentation cross-entropy (why 3: docs/results.md); 0 = cross-entropy only
AUX_WEIGHT: float = 1.0  # deep supervision: weight of each coarse head's seg cross-entropy (AUX_STRIDES), training only; 0 = off (no aux heads)
AUX_STRIDES: list[int] = [32, 16, 8]  # decoder strides that get a deep-supervision head, any of 32, 16, 8, 4 (used when AUX_WEIGHT > 0)
CLS_WEIGHT: float = 0.5  # weight of the classification cross-entropy
IGNORE_INDEX: int = 255  # mask value that is not scored
SEG_CLASS_WEIGHTS: list[float] | str | None = None  # per-class weights of the segmentation cross-entropy (not the Dice term); auto = inverse pixel frequency (training split)
CLS_CLASS_WEIGHTS: list[float] | str | None = None  # per-class weights of the classification loss; auto = inverse label frequency (training split)
LABEL_SMOOTHING: float = 0.0  # label smoothing of both cross-entropies
LOGIT_BOUND: float = 15.0  # logits pass through c*x/(c+|x|) in the loss: bounded, gradient never 0

# ---- Optimisation ----
EPOCHS: int = 20  # training epochs (why 20: docs/results.md)
BATCH_SIZE: int = 8  # images per step (per process under torchrun)
OPTIMIZER: str = "adamw"  # adamw | sgd
BASE_LR: float = 1e-3  # peak learning rate, reached at the end of warm-up
MIN_LR: float = 1e-6  # floor of the schedule; the learning rate never goes below it
WARMUP_EPOCHS: float = 1.0  # linear warm-up length in epochs (converted to steps)
LR_DECAY: str = "cosine"  # cosine | exponential | constant, after warm-up
LR_GAMMA: float = 0.95  # per-epoch factor of the exponential decay
WEIGHT_DECAY: float = 1e-4  # decoupled weight decay (AdamW) or L2 (SGD)
MOMENTUM: float = 0.9  # SGD momentum
EMA_DECAY: float = 0.0  # exponential moving average of the weights (evaluated and saved for inference); 0 = off
MAX_GRAD_NORM: float = 1.0  # clip the global gradient norm to this
AMP: str = "auto"  # auto | off | bf16 | fp16; auto: bf16 on CUDA GPUs and CPUs that compute it natively, else off (logged)
CHANNELS_LAST: str = "auto"  # auto | on | off: channels-last memory format for model and inputs; auto: on where it measured faster (logged)
COMPILE: str = "auto"  # auto | on | off: torch.compile the model for training and evaluation; auto: on where it pays over the run (logged)

# ---- Guard ----
SKIP_GRAD_NORM: float = 100.0  # skip a step whose pre-clip gradient norm exceeds this
GRAD_SPIKE_FACTOR: float = 0.0  # skip when the pre-clip norm exceeds this x the running median (0 = off)
LOSS_SPIKE_FACTOR: float = 0.0  # skip when the loss exceeds this x the running median (0 = off)
SPIKE_WINDOW: int = 50  # accepted steps in the running medians
SPIKE_WARMUP: int = 20  # accepted steps before spike checks start
MAX_SKIP_FRACTION: float = 0.25  # stop the run when more than this fraction of an epoch's steps were skipped
MAX_CONSECUTIVE_SKIPS: int = 5  # this many skipped steps in a row trigger a rollback to the last snapshot
MAX_ROLLBACKS: int = 3  # abort the run (exit 1) when one more rollback would be needed
LR_BACKOFF: float = 0.5  # each rollback multiplies the learning rate by this
SNAPSHOT_EVERY: int = 100  # accepted steps between in-memory snapshots (the rollback target)
BAD_BATCH_LIMIT: int = 5  # the first this-many skipped batches are saved to <out_dir>/bad_batches/

# ---- Results ----
VIS_EVERY: int = 1  # write vis/epoch_N.png (predictions on fixed val images) every this many epochs (0 = off)
VIS_SAMPLES: int = 8  # validation images in the prediction grid (the first ones of the val set)
TENSORBOARD: bool = False  # also log scalars and the prediction grid to OUT_DIR/tensorboard (pip install tensorboard)
EVAL_ONLY: bool = False  # evaluate --checkpoint on the val split: tables, eval.json, confusion CSVs; no training
CHECKPOINT: str | None = None  # checkpoint for --eval-only / --predict / --export (--predict also takes a .pt2 of --export); its settings apply unless given again
PREDICT: str | None = None  # image file or folder: write masks, overlays and predictions.csv of --checkpoint to --out
OUT: str | None = None  # output folder of --predict (required) and --eval-only (default: the checkpoint's folder)
EXPORT: str | None = None  # write --checkpoint's model for deployment: PATH.pt2 (torch.export) or PATH.onnx, plus PATH.json (docs/export.md)

# ---- Run ----
SEED: int = 0  # seeds python, numpy and torch
DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
OUT_DIR: str | None = None  # run folder (default runs/<timestamp>)
RESUME: str | None = None  # checkpoint to resume from, or auto (<out_dir>/last.pt if it exists); its settings apply unless given again
CHECKPOINT_EVERY: int = 200  # also write last.pt every this many steps (0 = only at epoch ends)
SYNC_BN: bool = False  # under torchrun on CUDA: SyncBatchNorm (batch statistics over all GPUs)
DETERMINISTIC: bool = False  # CUDA: deterministic algorithms, no cuDNN autotuning (bit-identical resume, slower)
SCALE_LR: bool = False  # under torchrun: multiply base_lr by the number of processes (linear scaling rule)
REQUIRE_LEARNING: bool = True  # exit 1 when a head did not learn or memorised (the verdict is logged either way)
PATIENCE: int = 10  # stop after this many epochs without a better val mIoU
LOG_INTERVAL: int = 10  # steps between log lines (the only host syncs of the loop)
BN_RECALIBRATE: int = 0  # before each evaluation, re-estimate BatchNorm statistics over this many train batches (0 = off)

_CHOICES = {
    "DATASET": ("synthetic", "folder", "oxford_pet"),
    "PET_TARGET": ("breed", "species"),
    "BACKBONE": ("adaptivestream", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large"),
    "CLS_POOL": ("avg", "avgmax"),
    "OPTIMIZER": ("adamw", "sgd"),
    "LR_DECAY": ("cosine", "exponential", "constant"),
    "AMP": ("auto", "off", "bf16", "fp16"),
    "CHANNELS_LAST": ("auto", "on", "off"),
    "COMPILE": ("auto", "on", "off"),
}
AUX_STRIDE_CHOICES = (32, 16, 8, 4)  # the decoder levels a deep-supervision head can sit on
_POSITIVE = {"IMAGE_SIZE", "MASK_SCALE", "CROP_SCALE", "VAL_FRACTION", "NUM_SEG_CLASSES", "NUM_CLS_CLASSES", "SYNTHETIC_TRAIN_SIZE", "SYNTHETIC_TRAIN_SETS",
             "SYNTHETIC_VAL_SIZE",
             "WIDTH", "STREAM_CHANNELS", "DECODER_CHANNELS", "EPOCHS", "BATCH_SIZE", "BASE_LR", "MIN_LR",
             "MAX_CONSECUTIVE_SKIPS", "SNAPSHOT_EVERY", "LR_BACKOFF", "VIS_SAMPLES",
             "MAX_GRAD_NORM", "SKIP_GRAD_NORM", "LR_GAMMA", "LOGIT_BOUND", "SPIKE_WINDOW", "LOG_INTERVAL"}
_NON_NEGATIVE = {"EMA_DECAY", "DICE_WEIGHT", "AUX_WEIGHT", "NUM_WORKERS", "SEG_WEIGHT", "CLS_WEIGHT", "WEIGHT_DECAY", "MOMENTUM", "WARMUP_EPOCHS",
                 "GRAD_SPIKE_FACTOR", "LOSS_SPIKE_FACTOR", "HFLIP", "COLOR_JITTER", "SPIKE_WARMUP", "PATIENCE", "SEED",
                 "LABEL_SMOOTHING", "BN_RECALIBRATE", "MAX_ROLLBACKS", "BAD_BATCH_LIMIT", "CHECKPOINT_EVERY", "VIS_EVERY"}
_FRACTIONS = {"EMA_DECAY", "VAL_FRACTION", "HFLIP", "CROP_SCALE", "COLOR_JITTER", "MAX_SKIP_FRACTION", "LABEL_SMOOTHING",
              "LR_GAMMA", "LR_BACKOFF"}


# Settings that describe one command, not the run: never written to a run's config.yaml, so that
# `--config runs/a/config.yaml` repeats the run instead of resuming or re-evaluating it.
INVOCATION_ONLY = ("out_dir", "resume", "eval_only", "checkpoint", "predict", "out", "export")


class ConfigError(ValueError):
    """A bad setting; the message names the key and what to do. main() exits with code 2."""


class Config(types.SimpleNamespace):
    """The resolved settings, as lower-case attributes (cfg.base_lr)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def settings() -> dict[str, tuple[Any, Any, str]]:
    """NAME -> (type hint, default, one-line help), in file order."""
    hints = typing.get_type_hints(sys.modules[__name__])
    helps = {}
    for line in Path(__file__).read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)\s*:.*?#\s*(.*)$", line)
        if match:
            helps[match.group(1)] = match.group(2)
    return {name: (hints[name], globals()[name], helps.get(name, "")) for name in helps}


def defaults() -> dict[str, Any]:
    """lower-case key -> default value."""
    return {name.lower(): default for name, (_, default, _) in settings().items()}


def flag(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _closest(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(key: str, value: Any, hint: Any, from_cli: bool) -> Any:
    """Return value as the type of hint, or raise ConfigError naming key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            if type(None) in members:
                return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(key, value, member, from_cli)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if hint is str and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads on/off/yes/no/true/false as booleans: amp: off
    if from_cli and isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if origin is list:
        (item,) = typing.get_args(hint)
        if from_cli and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif from_cli and isinstance(value, (int, float)):
            value = [value]  # one item: YAML read "--aux-strides 8" as the number 8
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(key, v, item, False) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint in (int, float) and isinstance(value, str):
        # PyYAML reads 3e-4 (no dot) as a string; accept any number spelling Python accepts.
        try:
            value = hint(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    return float(value) if hint is float else value


def parse_color(text: str) -> tuple[int, int, int]:
    """'R,G,B' or '#rrggbb' -> (r, g, b); ValueError otherwise."""
    text = str(text).strip()
    if text.startswith("#") and len(text) == 7:
        return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise ValueError(text)
    return tuple(parts)  # type: ignore[return-value]


def color_map_table(cfg: Config) -> dict[tuple[int, int, int], int]:
    """cfg.color_map as (r, g, b) -> class index; raise ConfigError naming the bad entry."""
    names = cfg.seg_class_names or []
    table = {}
    for key, value in (cfg.color_map or {}).items():
        try:
            color = parse_color(key)
        except ValueError:
            raise ConfigError(f"color_map: key {key!r} is not a colour; write 'R,G,B' (0-255) or '#rrggbb'") from None
        if isinstance(value, str) and value in names:
            value = names.index(value)
        if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value < cfg.num_seg_classes or value == cfg.ignore_index):
            raise ConfigError(f"color_map: {key!r} maps to {value!r}, which is not a class index in "
                              f"[0, {cfg.num_seg_classes}), ignore_index {cfg.ignore_index} or a seg_class_names entry")
        if color in table:
            raise ConfigError(f"color_map: colour {color} is listed twice")
        table[color] = value
    return table


def _validate_data(cfg: Config) -> None:
    """Cross-field checks of the Data settings."""
    for key in ("seg_class_weights", "cls_class_weights"):
        if isinstance(getattr(cfg, key), str) and getattr(cfg, key) != "auto":
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is neither 'auto' nor a list of numbers")
    if cfg.val_fraction >= 1:
        raise ConfigError(f"val_fraction: must be < 1 (some images must stay for training), got {cfg.val_fraction}")
    if cfg.label_regex is not None:
        try:
            groups = re.compile(cfg.label_regex).groups
        except re.error as err:
            raise ConfigError(f"label_regex: {cfg.label_regex!r} is not a valid regular expression ({err})") from None
        if groups < 1:
            raise ConfigError(f"label_regex: {cfg.label_regex!r} has no (group); the first group is the label")
    color_map_table(cfg)
    if cfg.dataset == "oxford_pet":
        classes = 37 if cfg.pet_target == "breed" else 2
        if cfg.num_seg_classes != 2:
            raise ConfigError(f"num_seg_classes: oxford_pet masks have 2 classes (background, pet), got "
                              f"{cfg.num_seg_classes}: pass --num-seg-classes 2")
        if cfg.num_cls_classes != classes:
            raise ConfigError(f"num_cls_classes: oxford_pet with pet_target {cfg.pet_target} has {classes} classes, "
                              f"got {cfg.num_cls_classes}: pass --num-cls-classes {classes}")


def validate(cfg: Config, checkpoint_to_come: bool = False) -> None:
    """Range and cross-field checks; raise ConfigError naming the key. checkpoint_to_come: a resume, --eval-only,
    --predict or --export, whose checkpoint's settings complete this command's; the checks between keys wait for
    them (the merged settings are validated again)."""
    values = {k.upper(): v for k, v in cfg.to_dict().items()}
    for name, choices in _CHOICES.items():
        if values[name] not in choices:
            raise ConfigError(f"{name.lower()}: {values[name]!r} is not one of {', '.join(choices)}"
                              f"{_closest(str(values[name]), list(choices))}")
    for name in _POSITIVE:
        if not values[name] > 0:
            raise ConfigError(f"{name.lower()}: must be > 0, got {values[name]}")
    for name in _NON_NEGATIVE:
        if not values[name] >= 0:
            raise ConfigError(f"{name.lower()}: must be >= 0, got {values[name]}")
    for name in _FRACTIONS:
        if not values[name] <= 1:
            raise ConfigError(f"{name.lower()}: must be <= 1, got {values[name]}")
    if cfg.ema_decay >= 1:
        raise ConfigError(f"ema_decay: must be < 1 (1 would never move the average), got {cfg.ema_decay:g}; "
                          f"0.999 is usual, 0 turns it off")
    bad = [s for s in cfg.aux_strides if s not in AUX_STRIDE_CHOICES]
    if bad or not cfg.aux_strides or len(set(cfg.aux_strides)) != len(cfg.aux_strides):
        raise ConfigError(f"aux_strides: {cfg.aux_strides} must be one or more different strides of "
                          f"{', '.join(map(str, AUX_STRIDE_CHOICES))} (to turn deep supervision off: --aux-weight 0)")
    if cfg.stem_kernel < 1 or cfg.stem_kernel % 2 == 0:
        raise ConfigError(f"stem_kernel: must be an odd number such as 3, 5 or 7 (the stem pads k // 2 on each "
                          f"side, so an even kernel would shift the features), got {cfg.stem_kernel}")
    _validate_modes(cfg)
    if checkpoint_to_come:
        return
    if cfg.min_lr > cfg.base_lr:
        raise ConfigError(f"min_lr ({cfg.min_lr:g}) is above base_lr ({cfg.base_lr:g}): lower min_lr or raise base_lr")
    if cfg.num_seg_classes < 2:
        raise ConfigError(f"num_seg_classes: need at least 2 (background + one class), got {cfg.num_seg_classes}")
    if cfg.num_cls_classes < 2:
        raise ConfigError(f"num_cls_classes: need at least 2, got {cfg.num_cls_classes}")
    for key, count in (("seg_class_names", cfg.num_seg_classes), ("cls_class_names", cfg.num_cls_classes),
                       ("seg_class_weights", cfg.num_seg_classes), ("cls_class_weights", cfg.num_cls_classes)):
        value = getattr(cfg, key)
        if isinstance(value, list) and len(value) != count:
            raise ConfigError(f"{key}: has {len(value)} entries but there are {count} classes")
    if 0 <= cfg.ignore_index < cfg.num_seg_classes:
        raise ConfigError(f"ignore_index ({cfg.ignore_index}) is a real class index (< num_seg_classes)")
    if cfg.dataset != "synthetic" and not cfg.data_root:
        raise ConfigError(f"data_root: dataset {cfg.dataset!r} needs --data-root PATH")
    _validate_data(cfg)


def _validate_modes(cfg: Config) -> None:
    """--eval-only / --predict / --export and the keys that only they use."""
    modes = [name for name, on in (("--eval-only", cfg.eval_only), ("--predict", cfg.predict),
                                   ("--export", cfg.export)) if on]
    if len(modes) > 1:
        keys = ", ".join(name[2:].replace("-", "_") for name in modes)
        raise ConfigError(f"{keys}: choose one of --eval-only, --predict and --export per command")
    mode = modes[0] if modes else None
    if mode and not cfg.checkpoint:
        raise ConfigError(f"checkpoint: {mode} needs --checkpoint FILE.pt (for example runs/a/best.pt)")
    if cfg.predict and not cfg.out:
        raise ConfigError("out: --predict needs --out DIR for the masks, overlays and predictions.csv")
    if not mode and cfg.checkpoint:
        raise ConfigError("checkpoint: only used with --eval-only, --predict or --export; to continue training use "
                          "--resume")
    if not mode and cfg.out:
        raise ConfigError("out: only used with --eval-only or --predict; a training run's folder is --out-dir")
    if cfg.export:
        if cfg.out:
            raise ConfigError("out: --export writes to its own PATH (and PATH.json); drop --out")
        if Path(cfg.export).suffix not in (".pt2", ".onnx"):
            raise ConfigError(f"export: {cfg.export!r} must end in .pt2 (a torch.export program) or .onnx (ONNX)")
        # The file is traced and checked on the CPU and loads on any device; a CUDA trace would not load without one.
        if cfg.device not in ("auto", "cpu"):
            raise ConfigError(f"device: --export runs on the CPU (move the loaded model with .to(device)); "
                              f"drop --device {cfg.device}")


# Data settings only some datasets read: set for another dataset they do nothing, which start-up says.
DATASET_ONLY = {"data_root": ("folder", "oxford_pet"), "mask_suffix": ("folder",), "mask_scale": ("folder",),
                "color_map": ("folder",), "label_regex": ("folder",), "val_fraction": ("folder",),
                "pet_target": ("oxford_pet",), "download": ("oxford_pet",),
                "synthetic_train_size": ("synthetic",), "synthetic_train_sets": ("synthetic",),
                "synthetic_val_size": ("synthetic",)}


# Settings of the built-in encoder: with a torchvision backbone they do nothing, which start-up says.
BUILTIN_ENCODER_ONLY = ("width", "stem_kernel")


def unused_settings(cfg: Config, given: set[str] | None = None) -> list[str]:
    """Warnings for the DATASET_ONLY settings changed from their default that cfg.dataset ignores, and the
    BUILTIN_ENCODER_ONLY ones that a torchvision backbone ignores; given: only about these keys (a resume: the
    ones its command sets, not those its checkpoint brings)."""
    default = defaults()

    def changed(key: str) -> bool:
        return getattr(cfg, key) != default[key] and (given is None or key in given)

    warnings = [f"{key} is set but dataset {cfg.dataset} does not use it (only {' and '.join(users)}): it has no effect"
                for key, users in DATASET_ONLY.items() if cfg.dataset not in users and changed(key)]
    if cfg.backbone != "adaptivestream":
        warnings += [f"{key} is set but backbone {cfg.backbone} does not use it (only the built-in adaptivestream): "
                     f"it has no effect" for key in BUILTIN_ENCODER_ONLY if changed(key)]
    return warnings


def effective_warmup_epochs(cfg: Config) -> float:
    """WARMUP_EPOCHS, shortened to half the run when it would fill the whole run (--epochs 1 with defaults)."""
    return cfg.warmup_epochs if cfg.warmup_epochs < cfg.epochs else cfg.epochs / 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     description="Settings default to config.py; YAML keys are the lower-case names.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (lower-case keys)")
    for name, (hint, default, help_text) in settings().items():
        # A comment that explains its None default ("default: the checkpoint's folder") says it better.
        if "(default" not in help_text:
            help_text = f"{help_text} (default {default})"
        if hint is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag(name), dest=name, metavar=name, help=help_text)
    return parser


def parser_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long flags a script's own parser defines (for load_config's own_flags)."""
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"]


def load_config(argv: list[str] | None = None, prog: str | None = None,
                own_flags: list[str] | tuple[str, ...] = (), checkpoint_to_come: bool = False) -> Config:
    """Resolve defaults < --config YAML < command-line flags; raise ConfigError on a bad setting.

    own_flags: the calling script's own flags (diagnose, bench), parsed before this; a typo is matched
    against them too, so `--stpes` suggests `--steps` rather than the nearest training flag.
    checkpoint_to_come: the training script, which merges a --resume / --checkpoint file's settings into these
    and validates the result: the checks between keys wait for that when the command has such a file.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    table = settings()
    parser = build_parser(prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        word = unknown[0].split("=")[0]
        flags = [flag(n) for n in table] + ["--config", *own_flags]
        raise ConfigError(f"unknown flag {word}{_closest(word, flags)}; see --help for the list")
    values = {name: default for name, (_, default, _) in table.items()}
    config_path = getattr(args, "config", None)
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config: file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of settings, got {type(data).__name__}")
        keys = [n.lower() for n in table]
        for key, value in data.items():
            name = str(key).upper()
            if name not in table or str(key) != name.lower():
                raise ConfigError(f"{path}: unknown key {key!r}{_closest(str(key).lower(), keys)}")
            values[name] = _coerce(f"{key} (in {path})", value, table[name][0], from_cli=False)
    for name, raw in vars(args).items():
        if name in table:
            values[name] = _coerce(flag(name), raw, table[name][0], from_cli=not isinstance(raw, bool))
    cfg = Config(**{name.lower(): value for name, value in values.items()})
    validate(cfg, checkpoint_to_come=checkpoint_to_come and bool(cfg.resume or cfg.eval_only or cfg.predict or
                                                                  cfg.export))
    return cfg


def markdown_table() -> str:
    rows = ["| YAML key / flag | default | meaning |", "| --- | --- | --- |"]
    for name, (_, default, help_text) in settings().items():
        shown = f"`{default}`" if default != "" else '`""`'
        rows.append(f"| `{name.lower()}` / `{flag(name)}` | {shown} | {help_text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv[1:]:
        print(markdown_table())
    else:
        print(yaml.safe_dump({n.lower(): d for n, (_, d, _) in settings().items()}, sort_keys=False), end="")
