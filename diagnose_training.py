"""Diagnose a training setup: config, data, model, loss, gradients, schedule, NaN sources, run folder, checkpoint.

    python diagnose_training.py --quick                                   # the default config, < 1 min on 2 CPU cores
    python diagnose_training.py --config my.yaml                          # same flags as training (+ overfit test)
    python diagnose_training.py --run runs/a --checkpoint runs/a/last.pt  # uses runs/a/config.yaml unless --config
    python diagnose_training.py --batch runs/a/bad_batches/step_123.pt    # replay a skipped batch (with runs/a/config.yaml)
    python diagnose_training.py --quick --json report.json                # the same results, machine-readable

Every training flag works here (they go to config.load_config). Each check prints one line
``PASS|WARN|FAIL|SKIP  <name>  <measured value>  <rule>`` and, for WARN/FAIL, one concrete fix; the end
is a ranked list of likely root causes. Exit codes: 0 nothing failed; 1 a check failed; 2 the script
could not run (bad arguments, unreadable files), with a message naming the flag or file.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, NoReturn

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import config
import train_enhanced_adaptivestream as T
from data import (DOMINANT_CLASS_FRACTION, Baselines, DataError, build_datasets, build_loaders, data_baselines,
                  invalid_mask_values, uniform_dice, value_counts)
from results import column, read_metrics
from config import Config, ConfigError, load_config, parser_flags

# ---- Thresholds (every numeric rule of the report) ----
LR_RANGE = {"adamw": (1e-5, 1e-2), "sgd": (1e-4, 1.0)}  # usual peak LRs per optimizer; outside -> WARN
LR_ZERO = 1e-9  # a learning rate below this is ~0: the run has stopped learning (the old 8.88e-21 failure)
WARMUP_MAX_FRACTION = 0.3  # warm-up longer than this fraction of the run -> WARN
DROP_LAST_MAX_FRACTION = 0.2  # drop_last discarding more of the training set per epoch -> WARN
BN_MIN_BATCH = 4  # BatchNorm statistics of fewer images are noisy -> WARN
QUICK_SCAN_SAMPLES = 64  # samples per split that --quick decodes and checks (full mode: every sample)
JPEG_EXTRA_VALUES = 8  # more distinct mask values than classes + this: JPEG artefacts or bilinear resizing
IGNORE_MAX_FRACTION = 0.5  # more mask pixels equal to ignore_index -> WARN
IMAGE_MEAN_MAX_ABS = 1.5  # per-channel batch mean beyond this -> WARN (ImageNet-normalised pixels span [-2.1, 2.6])
IMAGE_STD_RANGE = (0.3, 3.0)  # per-channel std of normalised images outside this -> WARN
IMAGE_RAW_LIMIT = 20.0  # |mean| or std beyond this: images were not normalised at all (0-255) -> FAIL
INIT_LOSS_TOLERANCE = 0.25  # each head's loss at init within +-25% of its uniform guess: ln(C), + dice_weight x uniform Dice for seg
GRAD_VANISH_RATIO = 1e-7  # a layer's gradient norm below this x the largest layer's -> WARN (vanishing)
GRAD_EXPLODE_NORM = 1e3  # a layer's gradient norm above this -> FAIL (exploding)
UPDATE_RATIO_RANGE = (1e-5, 1e-1)  # ||update|| / ||weight|| per layer after one step at the peak LR
FP16_MAX = 65504.0  # largest finite float16: a float32 activation above it overflows under fp16 autocast
OVERFIT_SAMPLES = 4  # samples the overfit test memorises
OVERFIT_LR = 1e-2  # AdamW LR of the overfit test (a memorisation recipe, independent of the configured LR:
# at the default 1e-3 the tiny test model needs >200 steps; the configured LR is judged by update.ratio)
OVERFIT_MAX_STEPS = 200  # steps it may take
OVERFIT_MIN_DROP = 0.9  # the loss must fall by at least this fraction
OVERFIT_WARMUP_STEPS = 10  # linear warm-up of the overfit test's LR
OVERFIT_CHECK_EVERY = 10  # steps between the overfit test's host syncs (early stop)
INPUT_DEPENDENCE_MIN_RATIO = 2.0  # after overfitting, loss(zeroed inputs) / loss(real inputs) at least this
BN_LOSS_RATIO_MAX = 1.5  # eval-mode loss above this x batch-statistics loss (+ slack) -> FAIL
BN_LOSS_SLACK = 0.05  # absolute slack, so two tiny losses do not fail on their ratio alone
BN_ACC_DROP_MAX = 0.3  # eval-mode accuracy (cls or pixel) lower than batch-statistics accuracy by more -> FAIL
BN_DISTANCE_WARN = 3.0  # running mean/var this far from batch statistics (running stds + |log var ratio|) -> WARN
BN_CHECK_BATCHES = 4  # training batches the BatchNorm check compares eval and batch-statistics predictions on
BN_RECALIBRATE_BATCHES = 8  # batches the BN fix is tried with (the training flag --bn-recalibrate N)
RUN_SKIP_WARN_FRACTION = 0.0  # any skipped step in an epoch -> WARN
RUN_SKIP_FAIL_FRACTION = 0.25  # above this (or the run's lower max_skip_fraction) -> FAIL, even if the run went on
GENERALIZATION_MAX_GAP = 0.3  # last epoch's train cls acc above val cls acc by more -> FAIL (memorising)
RUN_LOSS_RISE_MAX = 0.1  # last epoch's train loss above the first's by more than this fraction -> FAIL
NAMES_SHOWN = 5  # names listed per line (the JSON has them all)

# Causes of the ranked summary, upstream first: a cause explains the failures of the ones after it.
CAUSES = {
    "data": "the data: files, masks, labels or normalisation are not what the model and loss expect",
    "config": "the configuration: a setting that does not fit this model or data",
    "architecture": "the model's architecture: output shapes or unused parameters",
    "weights": "the weights: non-finite or incompatible with the config",
    "init": "the initialisation or the loss at step 0",
    "numerics": "numerics: an operation that produces NaN/Inf, or the fp16/bf16 range",
    "gradients": "gradient flow: vanishing or exploding gradients",
    "lr": "the learning rate or its schedule",
    "learning": "the setup cannot learn: overfit or input-dependence test",
    "generalization": "the model memorises the training set instead of learning what carries over to new images",
    "batchnorm": "BatchNorm running statistics (eval mode differs from train mode)",
    "run": "symptoms in the run folder (explained by a cause above when one is listed)",
}


class UsageError(ValueError):
    """Bad arguments or an unreadable file: the script cannot run. main() exits with code 2."""


# ---- Report ----
@dataclass
class Check:
    """One line of the report; status PASS | WARN | FAIL | SKIP."""

    name: str
    status: str
    value: str
    rule: str
    fix: str = ""
    cause: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<22}  {self.value}  [{self.rule}]"
        return text + (f"\n      fix: {self.fix}" if self.fix and self.status in ("WARN", "FAIL") else "")


def judge(name: str, ok: bool, value: str, rule: str, fix: str, cause: str, *, warn: bool = False,
          details: dict[str, Any] | None = None) -> Check:
    """PASS when ok, else FAIL (or WARN when warn=True), with the fix kept only for a WARN/FAIL."""
    status = "PASS" if ok else ("WARN" if warn else "FAIL")
    return Check(name, status, value, rule, "" if ok else fix, cause, details or {})


def skip(name: str, why: str) -> Check:
    return Check(name, "SKIP", why, "not run")


def ranked_causes(checks: list[Check]) -> list[dict[str, Any]]:
    """Causes with a WARN/FAIL, most likely first: any FAIL before WARN, then upstream before downstream."""
    order = list(CAUSES)
    grouped: dict[str, list[Check]] = {}
    for check in checks:
        if check.status in ("WARN", "FAIL"):
            grouped.setdefault(check.cause or "run", []).append(check)
    ranked = sorted(grouped.items(),
                    key=lambda item: (all(c.status == "WARN" for c in item[1]), order.index(item[0])))
    return [{"cause": cause, "description": CAUSES[cause],
             "status": "FAIL" if any(c.status == "FAIL" for c in found) else "WARN",
             "checks": [c.name for c in found],
             "fix": next((c.fix for c in sorted(found, key=lambda c: c.status != "FAIL") if c.fix), "")}
            for cause, found in ranked]


def format_summary(checks: list[Check]) -> str:
    counts = Counter(c.status for c in checks)
    lines = [f"\n{counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"]
    causes = ranked_causes(checks)
    if causes:
        lines.append("Likely root causes, most likely first:")
        for i, cause in enumerate(causes, 1):
            lines.append(f"  {i}. [{cause['status']}] {cause['description']}: {', '.join(cause['checks'])}")
            lines.append(f"     fix: {cause['fix']}")
    else:
        lines.append("No likely root cause found: every check passed.")
    return "\n".join(lines)


# ---- Helpers ----
@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Run probes on model and put its parameters, BN buffers, mode and gradients back afterwards."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    training = model.training
    try:
        yield model
    finally:
        model.load_state_dict(state)
        model.train(training)
        model.zero_grad(set_to_none=True)


def batch_tensors(batch: dict[str, Any], cfg: Config, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(images, masks int64, labels int64) on device, exactly as the training loop moves them."""
    return T.to_device(batch, SimpleNamespace(cfg=cfg, device=device))


def count_values(tensor: torch.Tensor) -> Counter:
    """value -> count of a tensor, through the training script's numpy counter (torch.unique is slow on CPU)."""
    tensor = tensor.detach().cpu()
    values, counts = value_counts((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy())
    return Counter(dict(zip(values.tolist(), counts.tolist())))


def show(names: list[str]) -> str:
    extra = len(names) - NAMES_SHOWN
    return ", ".join(names[:NAMES_SHOWN]) + (f" (+{extra} more)" if extra > 0 else "")


def show_values(values: Iterable[float]) -> str:
    values = sorted(values)
    text = ", ".join(f"{v:g}" for v in values[:10])
    return "{" + text + (f", ... {values[-1]:g}" if len(values) > 10 else "") + "}"


# ---- config: settings that cannot work ----
def check_config(cfg: Config, train_size: int | None, steps_per_epoch: int | None) -> list[Check]:
    """LR range, MIN_LR > 0, warm-up shorter than the run, batch size against the dataset size."""
    low, high = LR_RANGE[cfg.optimizer]
    checks = [
        judge("config.base_lr", low <= cfg.base_lr <= high, f"{cfg.base_lr:g} ({cfg.optimizer})",
              f"in [{low:g}, {high:g}]",
              f"--base-lr {min(max(cfg.base_lr, low), high):g} is a usual start for {cfg.optimizer}; "
              f"confirm with update.ratio", "lr", warn=True),
        judge("config.min_lr", cfg.min_lr >= LR_ZERO, f"{cfg.min_lr:g}", f">= {LR_ZERO:g}",
              f"--min-lr {cfg.base_lr * 1e-3:g}: a floor of ~0 lets the schedule stop learning", "lr"),
        judge("config.batch_size", cfg.batch_size >= BN_MIN_BATCH, f"{cfg.batch_size}", f">= {BN_MIN_BATCH}",
              f"BatchNorm statistics of {cfg.batch_size} images are noisy: raise --batch-size, "
              f"or use --bn-recalibrate {BN_RECALIBRATE_BATCHES}", "config", warn=True),
    ]
    if train_size is None or steps_per_epoch is None:
        return checks + [skip("config.dataset_size", "no training set (see data.build)")]
    warmup = round(config.effective_warmup_epochs(cfg) * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    checks.append(judge("config.warmup", warmup < total and warmup <= WARMUP_MAX_FRACTION * total,
                        f"{warmup} of {total} steps", f"< {WARMUP_MAX_FRACTION:.0%} of the run",
                        f"--warmup-epochs {max(cfg.epochs * 0.1, 0.5):g}", "lr", warn=warmup < total))
    dropped = (train_size % cfg.batch_size) / max(train_size, 1) if train_size >= cfg.batch_size else 1.0
    checks.append(judge("config.dataset_size", train_size >= cfg.batch_size and dropped <= DROP_LAST_MAX_FRACTION,
                        f"{train_size} train images, batch {cfg.batch_size}: {steps_per_epoch} steps/epoch, "
                        f"{dropped:.0%} dropped", f">= 1 batch, <= {DROP_LAST_MAX_FRACTION:.0%} dropped",
                        f"use a --batch-size that divides {train_size} (or is much smaller)", "config",
                        warn=train_size >= cfg.batch_size))
    return checks


# ---- data and batch: files, masks, labels, one real batch ----
@dataclass
class DataScan:
    """What scanning samples of one split found."""

    scanned: int = 0
    total: int = 0
    errors: list[str] = field(default_factory=list)  # DataError / OSError messages (they name the file)
    bad_shapes: list[str] = field(default_factory=list)
    mask_values: Counter = field(default_factory=Counter)  # value -> pixels
    float_masks: int = 0
    labels: Counter = field(default_factory=Counter)
    nonfinite_images: list[str] = field(default_factory=list)


def scan_samples(dataset: Dataset, limit: int | None) -> DataScan:
    """Decode samples (all, or `limit` evenly spaced) through the dataset's own __getitem__ and transforms."""
    scan = DataScan(total=len(dataset))
    indices = range(len(dataset)) if limit is None or limit >= len(dataset) else \
        sorted(set(np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist()))
    for index in indices:
        scan.scanned += 1
        try:
            sample = dataset[index]
        except (DataError, OSError) as err:  # OSError: a truncated file the dataset did not wrap
            scan.errors.append(f"sample {index}: {err}")
            continue
        image, mask, sid = sample["image"], torch.as_tensor(sample["mask"]), sample.get("id", index)
        if image.dim() != 3 or image.shape[0] != 3 or tuple(mask.shape) != tuple(image.shape[1:]):
            scan.bad_shapes.append(f"{sid}: image {tuple(image.shape)} mask {tuple(mask.shape)}")
        if mask.is_floating_point():
            scan.float_masks += 1
        scan.mask_values.update(count_values(mask))
        scan.labels[int(sample["label"])] += 1
        if image.is_floating_point() and not np.isfinite(image.detach().float().cpu().numpy()).all():
            scan.nonfinite_images.append(str(sid))
    return scan


def judge_mask_values(name: str, values: Counter, cfg: Config, float_masks: int = 0) -> Check:
    """Mask values must be class indices in [0, S) or ignore_index; hints for 0/255 and JPEG-artefact masks."""
    classes, ignore = cfg.num_seg_classes, cfg.ignore_index
    total = max(sum(values.values()), 1)
    bad = sorted(invalid_mask_values(np.array(list(values), dtype=float), classes, ignore).tolist())
    ignored = values.get(ignore, 0) / total
    foreground = sum(n for v, n in values.items() if v != ignore and 0 < v < classes)
    # ignore_index 255 turns binary masks saved as 0/255 into "every object pixel is ignored": no error, no learning
    masked_0_255 = set(values) <= {0, 255} and 255 in values and (bool(bad) or foreground == 0)
    value = f"{len(values)} distinct {show_values(values)}, {ignored:.0%} = ignore_index {ignore}"
    if float_masks:
        value += f", {float_masks} float masks"
    rule = f"integers in [0, {classes}) or {ignore}"
    if masked_0_255:
        fix = ("masks look like 0/255 (binary masks saved as 8-bit images): map 255 -> 1 (mask // 255) "
               "so the object class is scored, or store class indices 0..num_seg_classes-1")
    elif len(values) > classes + JPEG_EXTRA_VALUES:
        fix = (f"{len(values)} distinct values for {classes} classes: JPEG artefacts or a bilinear resize. "
               "Save masks as PNG and resize them with nearest-neighbour interpolation")
    elif bad:
        fix = (f"values {show_values(bad)} are outside [0, {classes}): raise --num-seg-classes to "
               f"{int(max(bad)) + 1} or remap them (or set --ignore-index to the 'unlabelled' value)")
    else:
        fix = (f"{ignored:.0%} of pixels are ignore_index {ignore} and never scored: check the mask encoding")
    hard = bool(bad) or masked_0_255 or float_masks > 0
    return judge(name, not hard and ignored <= IGNORE_MAX_FRACTION, value, rule, fix, "data", warn=not hard)


def judge_balance(name: str, counts: Counter, num_classes: int, unit: str) -> Check:
    total = max(sum(n for v, n in counts.items() if 0 <= v < num_classes), 1)
    fractions = [counts.get(c, 0) / total for c in range(num_classes)]
    missing = [c for c, f in enumerate(fractions) if f == 0]
    top = int(np.argmax(fractions))
    value = f"largest class {top} = {fractions[top]:.1%} of {unit}" + (f", never present: {missing}" if missing else "")
    weights = "SEG_CLASS_WEIGHTS" if unit == "pixels" else "CLS_CLASS_WEIGHTS"
    return judge(name, fractions[top] <= DOMINANT_CLASS_FRACTION and not missing, value,
                 f"<= {DOMINANT_CLASS_FRACTION:.0%}, every class present",
                 f"set {weights.lower()} (inverse frequency) or resample; a class never present cannot be learnt: "
                 f"check num classes and the labels", "data", warn=True,
                 details={"fractions": fractions})


def check_data(splits: dict[str, Dataset], cfg: Config, limit: int | None) -> list[Check]:
    """Decode, pairing and sizes, mask values, label range, class balance over whatever build_datasets returned."""
    scans = {split: scan_samples(ds, limit) for split, ds in splits.items()}
    errors = [f"{split}: {e}" for split, s in scans.items() for e in s.errors]
    scanned = sum(s.scanned for s in scans.values())
    of = ", ".join(f"{s.scanned}/{s.total} {split}" for split, s in scans.items())
    checks = [judge("data.decode", not errors, f"{scanned - len(errors)} of {scanned} samples decode ({of})",
                    "every scanned sample decodes", f"fix or remove: {show(errors)}", "data",
                    details={"errors": errors})]
    shapes = [f"{split}/{b}" for split, s in scans.items() for b in s.bad_shapes]
    checks.append(judge("data.pairing", not shapes, f"{len(shapes)} samples with image/mask size mismatch",
                        "image [3, H, W], mask [H, W]", f"resize mask and image together (v2 joint transforms); "
                        f"a mask with 3 channels is an RGB mask: map colours to class indices: {show(shapes)}",
                        "data", details={"mismatches": shapes}))
    values = sum((s.mask_values for s in scans.values()), Counter())
    checks.append(judge_mask_values("data.mask_values", values, cfg, sum(s.float_masks for s in scans.values())))
    labels = sum((s.labels for s in scans.values()), Counter())
    bad_labels = sorted(v for v in labels if not 0 <= v < cfg.num_cls_classes)
    checks.append(judge("data.label_range", not bad_labels, f"labels {show_values(labels)}",
                        f"in [0, {cfg.num_cls_classes})", f"labels {bad_labels} are outside the class range: raise "
                        f"--num-cls-classes to {max(bad_labels or [0]) + 1} or fix the label source", "data"))
    nonfinite = [f"{split}/{i}" for split, s in scans.items() for i in s.nonfinite_images]
    checks.append(judge("data.finite", not nonfinite, f"{len(nonfinite)} images with NaN/Inf", "none",
                        f"check the image transform of {show(nonfinite)}", "data"))
    train = scans.get("train", next(iter(scans.values())))
    checks.append(judge_balance("data.seg_balance", train.mask_values, cfg.num_seg_classes, "pixels"))
    checks.append(judge_balance("data.cls_balance", train.labels, cfg.num_cls_classes, "labels"))
    return checks


def check_batch(batch: dict[str, Any], cfg: Config, prefix: str = "batch") -> list[Check]:
    """The batch the model actually receives: mask dtype and values, labels, finiteness, normalisation."""
    images, masks = batch["image"], torch.as_tensor(batch["mask"])
    labels = torch.as_tensor(batch["label"])
    integer = not masks.is_floating_point() and masks.dtype != torch.bool
    checks = [judge(f"{prefix}.mask_dtype", integer, str(masks.dtype), "an integer dtype",
                    "masks must be class indices (integers): a float mask was interpolated or scaled by "
                    "ToDtype(scale=True); wrap it in tv_tensors.Mask", "data")]
    shape_ok = images.dim() == 4 and masks.dim() == 3 and tuple(masks.shape) == (images.shape[0], *images.shape[2:])
    checks.append(judge(f"{prefix}.shapes", shape_ok, f"images {tuple(images.shape)}, masks {tuple(masks.shape)}",
                        "masks [B, H, W] of images [B, 3, H, W]", "a mask with a channel axis is an RGB or "
                        "[1, H, W] mask: squeeze it or map colours to class indices", "data"))
    checks.append(judge_mask_values(f"{prefix}.mask_values", count_values(masks), cfg, int(masks.is_floating_point())))
    bad = sorted(set(labels.tolist()) - set(range(cfg.num_cls_classes)))
    checks.append(judge(f"{prefix}.label_range", not bad, f"labels {show_values(set(labels.tolist()))}",
                        f"in [0, {cfg.num_cls_classes})", f"labels {bad} are out of range: fix the label source "
                        f"or --num-cls-classes", "data"))
    images = images.float()
    nonfinite = int((~torch.isfinite(images)).sum())
    checks.append(judge(f"{prefix}.finite", nonfinite == 0, f"{nonfinite} non-finite values", "0",
                        f"images of {show([str(i) for i in batch.get('id', [])])} hold NaN/Inf: check decoding "
                        f"and the transforms", "data"))
    dims = [0] + list(range(2, images.dim()))
    mean, std = images.mean(dims), images.std(dims)
    worst_mean, low, high = float(mean.abs().max()), float(std.min()), float(std.max())
    raw = worst_mean > IMAGE_RAW_LIMIT or high > IMAGE_RAW_LIMIT
    ok = worst_mean <= IMAGE_MEAN_MAX_ABS and IMAGE_STD_RANGE[0] <= low and high <= IMAGE_STD_RANGE[1]
    checks.append(judge(f"{prefix}.normalisation", ok, f"channel mean {[round(v, 2) for v in mean.tolist()]}, "
                        f"std {[round(v, 2) for v in std.tolist()]}",
                        f"|mean| <= {IMAGE_MEAN_MAX_ABS:g}, std in [{IMAGE_STD_RANGE[0]:g}, {IMAGE_STD_RANGE[1]:g}]",
                        "images look like raw 0-255 values: use v2.ToDtype(torch.float32, scale=True) then "
                        "v2.Normalize(mean, std)" if raw else "normalise with the dataset's (or ImageNet's) "
                        "mean/std after ToDtype(scale=True)", "data", warn=not raw))
    return checks


# ---- model, loss, grad, update: one forward and backward pass ----
def check_model(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: Config) -> list[Check]:
    """Forward on a real batch; seg logits the target's size, head widths, parameter count, finite parameters."""
    with preserved(model), torch.no_grad():
        try:
            seg, cls = model.train()(images)
        except RuntimeError as err:
            return [judge("model.forward", False, f"{type(err).__name__}: {str(err).splitlines()[0]}",
                          "forward runs on a real batch", "the model cannot take this input: check input size "
                          "and channels against the architecture", "architecture")]
    target = tuple(masks.shape[-2:])
    checks = [judge("model.forward", True, f"seg {tuple(seg.shape)}, cls {tuple(cls.shape)}", "runs", "", ""),
              judge("model.seg_size", tuple(seg.shape[-2:]) == target,
                    f"seg logits {seg.shape[-2]}x{seg.shape[-1]}, target {target[0]}x{target[1]}", "equal",
                    "the decoder must output the target's size: add upsampling stages (ConvTranspose2d) or "
                    "F.interpolate the logits to the mask size before the loss", "architecture"),
              judge("model.heads", seg.shape[1] == cfg.num_seg_classes and tuple(cls.shape) == (len(images),
                    cfg.num_cls_classes), f"seg channels {seg.shape[1]}, cls {tuple(cls.shape)}",
                    f"{cfg.num_seg_classes} seg channels, cls [B, {cfg.num_cls_classes}]",
                    "build the heads from num_seg_classes / num_cls_classes", "architecture")]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checks.append(judge("model.params", trainable > 0, f"{total / 1e6:.3f}M parameters, "
                        f"{trainable / 1e6:.3f}M trainable", "> 0 trainable",
                        "every parameter is frozen: set requires_grad=True", "architecture"))
    bad = T.nonfinite_tensors(model.state_dict())
    checks.append(judge("model.finite", not bad, f"{len(bad)} non-finite tensors {show(bad)}".strip(), "0",
                        "the weights hold NaN/Inf: re-initialise or load a finite checkpoint", "weights"))
    return checks


def check_initial_loss(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                       loss_fn: nn.Module, cfg: Config) -> list[Check]:
    """Each head's loss at init within +-INIT_LOSS_TOLERANCE of a uniform guess's: ln(C) for a cross-entropy, plus
    for seg dice_weight x the soft Dice of equal logits on this batch's masks (data.uniform_dice)."""
    with preserved(model), torch.no_grad():
        seg, cls = model.train()(images)
        try:
            _, parts = loss_fn(seg, cls, masks, labels)
        except ValueError as err:  # StableLoss names mismatched shapes; never a fallback value
            return [judge("loss.init", False, str(err), "the loss computes", "see model.seg_size / model.heads",
                          "architecture")]
        values = torch.stack([parts["seg"], parts["cls"]]).tolist()
    checks = []
    scored = masks[masks != cfg.ignore_index].long()
    dice = cfg.dice_weight * uniform_dice(torch.bincount(scored, minlength=cfg.num_seg_classes).cpu().numpy())
    for head, value, classes in (("seg", values[0], cfg.num_seg_classes), ("cls", values[1], cfg.num_cls_classes)):
        expected = math.log(classes) + (dice if head == "seg" else 0.0)
        uniform = f"ln({classes})" + (f" + dice {dice:.4f}" if head == "seg" and dice else "")
        off = value / expected - 1 if math.isfinite(value) else math.inf
        fix = ("the loss is non-finite at step 0: see nan.forward" if not math.isfinite(value) else
               "logits are too large at init: scale the last layer's init down (std ~0.5/sqrt(fan_in))" if off > 0
               else "the loss is too low for an untrained model: the target leaks into the input, or the loss "
                    "sees the wrong tensors")
        checks.append(judge(f"loss.init_{head}", abs(off) <= INIT_LOSS_TOLERANCE,
                            f"{value:.4f} vs {uniform} = {expected:.4f} ({off:+.0%})",
                            f"within +-{INIT_LOSS_TOLERANCE:.0%}", fix,
                            "numerics" if not math.isfinite(value) else "init"))
    return checks


def check_gradients(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    loss_fn: nn.Module, cfg: Config) -> list[Check]:
    """Every trainable parameter gets a finite gradient; total and per-layer norms; vanishing/exploding layers."""
    with preserved(model):
        model.train()
        T.training_objective(model, loss_fn, images, masks, labels)[0].backward()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in named if p.grad is None]
        flowing = [(n, p) for n, p in named if p.grad is not None]
        norms = torch.stack([p.grad.detach().float().norm() for _, p in flowing]).tolist() if flowing else []
    per_layer = {n: v for (n, _), v in zip(flowing, norms)}
    nonfinite = [n for n, v in per_layer.items() if not math.isfinite(v)]
    finite = {n: v for n, v in per_layer.items() if math.isfinite(v)}
    total = math.sqrt(sum(v * v for v in finite.values()))
    largest = max(finite.values(), default=0.0)
    vanishing = [n for n, v in finite.items() if v < GRAD_VANISH_RATIO * largest]
    exploding = [f"{n} ({v:.3g})" for n, v in finite.items() if v > GRAD_EXPLODE_NORM]
    top = sorted(finite.items(), key=lambda kv: -kv[1])[:3]
    huge = total > GRAD_EXPLODE_NORM
    norm = skip("grad.norm", "non-finite gradients (grad.finite)") if nonfinite else judge(
        "grad.norm", total <= cfg.skip_grad_norm, f"total {total:.4g}; largest "
        + ", ".join(f"{n} {v:.3g}" for n, v in top), f"<= skip_grad_norm {cfg.skip_grad_norm:g}",
        "the guard skips every step like this one: the norm of an untrained model is huge, so fix the loss "
        "scale or init (see grad.exploding)" if huge else f"the guard skips every step like this ordinary one: "
        f"raise --skip-grad-norm to about {10 * total:.3g} (10x the initial norm)",
        "gradients" if huge else "config", details={"per_layer": per_layer})
    return [
        judge("grad.flow", not missing, f"{len(flowing)} of {len(named)} trainable tensors get a gradient",
              "all", f"no gradient reaches {show(missing)}: unused in forward (remove, or freeze with "
              f"requires_grad=False) or cut by .detach()/no_grad", "architecture", details={"none": missing}),
        judge("grad.finite", not nonfinite, f"{len(nonfinite)} non-finite {show(nonfinite)}".strip(), "0",
              "see nan.backward for the module that produces them", "numerics"),
        norm,
        judge("grad.vanishing", not vanishing, f"{len(vanishing)} layers below {GRAD_VANISH_RATIO:g} x largest "
              f"{show(vanishing)}".strip(), f"norm >= {GRAD_VANISH_RATIO:g} x largest",
              "these layers barely learn: check saturating activations, BatchNorm placement, or a detach()",
              "gradients", warn=True),
        judge("grad.exploding", not exploding, f"{len(exploding)} layers above {GRAD_EXPLODE_NORM:g} "
              f"{show(exploding)}".strip(), f"norm <= {GRAD_EXPLODE_NORM:g}", "scale these layers' init down or "
              "add normalisation; the guard skips steps whose total norm exceeds skip_grad_norm", "gradients"),
    ]


def probe_run(model: nn.Module, loss_fn: nn.Module, cfg: Config, device: torch.device, warmup: int,
              steps: int) -> T.Run:
    """A real Run (build_optimizer, guard) around model for train_step; constant LR = base_lr after warm-up."""
    optimizer = T.build_optimizer(cfg, model)
    scheduler = T.WarmupLRScheduler(optimizer, warmup, steps, cfg.min_lr, decay="constant")
    return T.Run(cfg=cfg, model=model, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                 guard=T.StepGuard(model, cfg, device), device=device, train_loader=None, val_loader=None,
                 run_dir=Path("."), steps_per_epoch=steps, scaler=T.build_scaler(cfg, device))


def check_update_ratio(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                       loss_fn: nn.Module, cfg: Config) -> list[Check]:
    """||update|| / ||weight|| per weight tensor after one real train_step at the peak LR (base_lr)."""
    model = copy.deepcopy(model)
    run = probe_run(model, loss_fn, cfg, images.device, warmup=0, steps=1)
    weights = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    before = [p.detach().clone() for _, p in weights]
    stats = T.train_step(run, images, masks, labels)
    ratios = [(p.detach() - b).norm() / b.norm() for (_, p), b in zip(weights, before)]
    values = torch.stack([stats[4], *ratios]).tolist()  # the one host sync
    reason = int(values[0])
    if reason:  # nothing to measure; grad.norm or nan.* report why
        return [skip("update.ratio", f"the guard skipped the step ({T.SKIP_REASONS[reason]}): see grad.norm, nan.*")]
    ratio = {n: v for (n, _), v in zip(weights, values[1:]) if math.isfinite(v)}  # zero-init weights: no ratio
    low, high = UPDATE_RATIO_RANGE
    # Heads initialised small on purpose move by ~lr per element under Adam: large relative to their scale by
    # design, not a sign of the learning rate (T.AdaptiveStream.small_init_heads).
    heads = getattr(model, "small_init_heads", lambda: [])()
    small_init = {f"{n}.weight" for n, m in model.named_modules() if any(m is head for head, _ in heads)}
    small = [f"{n} ({v:.1e})" for n, v in ratio.items() if v < low]
    large = [f"{n} ({v:.1e})" for n, v in ratio.items() if v > high and n not in small_init]
    by_design = [f"{n} ({v:.1e})" for n, v in ratio.items() if v > high and n in small_init]
    median = float(np.median(list(ratio.values()))) if ratio else math.nan
    value = f"median {median:.1e} over {len(ratio)} weights at lr {cfg.base_lr:g}"
    if small or large:
        value += f"; too small: {show(small)}" if small else ""
        value += f"; too large: {show(large)}" if large else ""
    if by_design:
        value += f"; above {high:g} by design (heads initialised small): {show(by_design)}"
    fix = (f"updates rewrite >{high:.0%} of these layers per step: lower --base-lr" if large else
           "these layers barely move: raise --base-lr or check their init scale")
    return [judge("update.ratio", not small and not large, value, f"each in [{low:g}, {high:g}]", fix, "lr",
                  warn=True, details={"ratios": ratio})]


# ---- lr: the schedule over the whole run ----
def check_lr_schedule(cfg: Config, steps_per_epoch: int,
                      make_scheduler: Callable[..., Any] = T.build_scheduler) -> list[Check]:
    """Dry-run the schedule over the whole run on a throwaway optimizer: min/max LR, warm-up end, floor."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.base_lr)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: changes nothing, but keeps torch's step order
        scheduler.step()
    values = np.array(lrs)
    peak = int(np.argmax(values >= values.max() * (1 - 1e-9)))
    low_at = int(values.argmin())
    below = np.flatnonzero(values < cfg.min_lr * (1 - 1e-9))
    zero = np.flatnonzero(values[:-1] < LR_ZERO)
    above = values.max() > cfg.base_lr * (1 + 1e-9)
    value = (f"min {values.min():.3g} at step {low_at}, max {values.max():.3g}, warm-up ends at step {peak} "
             f"of {total}")
    if below.size:
        value += f"; below min_lr from step {below[0]}"
    if zero.size:
        value += f"; ~0 (< {LR_ZERO:g}) from step {zero[0]}"
    fix = ("the schedule has no floor: use the training script's WarmupLRScheduler (clamped to "
           "[min_lr, base_lr]); a per-step exponential decay reaches ~0 long before the end")
    if zero.size and not below.size and not above:
        fix = (f"the LR is ~0 for the last {total - zero[0]} steps: raise --min-lr to ~{cfg.base_lr * 1e-3:g} "
               f"or use a gentler decay (--lr-decay cosine, or a --lr-gamma nearer 1)")
    return [judge("lr.schedule", not below.size and not zero.size and not above, value,
                  f"min_lr {cfg.min_lr:g} <= lr <= base_lr {cfg.base_lr:g} at every step, lr >= {LR_ZERO:g}",
                  fix, "lr",
                  details={"min": float(values.min()), "max": float(values.max()), "warmup_end": peak})]


# ---- nan: where the first NaN/Inf appears ----
def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _max_abs(obj: Any, device: torch.device) -> torch.Tensor:
    """Largest |value| over the floating tensors of obj (tensor, tuple, list, dict, None), float32, on device.

    NaN when any value is NaN, Inf when any is Inf (the max propagates them): one reduction answers both
    "is it finite?" and "does it fit fp16?", without the bool tensor torch.isfinite allocates.
    """
    tensors = [t.detach() for t in _tensors(obj) if t.is_floating_point() and t.numel()]
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(t, ord=math.inf).float() for t in tensors]).amax().to(device)


@dataclass
class NonFiniteReport:
    """Where NaN/Inf first appear in one forward + backward pass."""

    precision: str
    modules: int
    input_finite: bool
    loss: float
    grad_norm: float
    forward_producer: str | None  # first module (in completion order) with finite inputs and a non-finite output
    forward_nonfinite: bool  # some module output is non-finite
    backward_producer: str | None  # first module (backward order) with finite grad_output, non-finite grad_input
    backward_nonfinite: bool
    nonfinite_grads: list[str]
    fp16_overflow: list[str]  # modules whose finite |output| exceeds FP16_MAX


def find_nonfinite(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                   loss_fn: nn.Module, amp: str = "off") -> NonFiniteReport:
    """Forward/backward hooks on every module; flags stay on the device and are read with one host sync.

    A module that passes NaN on has a non-finite input; the producer is the first whose inputs are finite
    and whose output (forward) or input-gradient (backward) is not. Children finish before their parents,
    so the innermost producer comes first.
    """
    device = images.device
    names = {module: name or f"<{type(model).__name__}>" for name, module in model.named_modules()}
    entered: dict[nn.Module, list[torch.Tensor]] = {}
    forward: list[tuple[str, torch.Tensor]] = []
    backward: list[tuple[str, torch.Tensor]] = []

    def before(module: nn.Module, args: Any) -> None:
        entered.setdefault(module, []).append(_max_abs(args, device))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        forward.append((names[module], torch.stack([entered[module].pop(), _max_abs(output, device)])))

    def on_grad(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        peaks = [_max_abs(grad_output, device), _max_abs(grad_input, device)]
        backward.append((names[module], torch.stack(peaks)))

    # Full backward hooks forbid in-place ops on a hooked module's output: switch them off for this pass.
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    handles = [h for m in names for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after),
                                          m.register_full_backward_hook(on_grad))]
    for module in inplace:
        module.inplace = False
    try:
        with preserved(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # list outputs (the encoder's) get no backward hook
            model.train()
            loss = T.training_objective(model, loss_fn, images, masks, labels, lambda: T.autocast(amp, device))[0]
            loss.backward()
            params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            grads = [p.grad.detach() for _, p in params]
            norms = torch.stack([g.float().norm() for g in grads]) if grads else torch.zeros(0, device=device)
            peaks = torch.stack([_max_abs(g, device) for g in grads]) if grads else norms  # finiteness per grad
            head = torch.stack([_max_abs(images, device), loss.detach().float(), torch.linalg.vector_norm(norms)])
            flat = torch.cat([head, *(f for _, f in forward), *(f for _, f in backward), peaks])
            values = flat.tolist()  # the one host sync
    finally:
        for handle in handles:
            handle.remove()
        for module in inplace:
            module.inplace = True
    ok = [math.isfinite(v) for v in values]  # max |x| is finite exactly when every value is
    fwd = [(name, ok[3 + 2 * i], ok[4 + 2 * i], values[4 + 2 * i]) for i, (name, _) in enumerate(forward)]
    offset = 3 + 2 * len(forward)
    bwd = [(name, ok[offset + 2 * i], ok[offset + 1 + 2 * i]) for i, (name, _) in enumerate(backward)]
    grad_ok = ok[offset + 2 * len(backward):]
    return NonFiniteReport(
        precision=str(T.AMP_DTYPES[amp]).replace("torch.", "") if amp != "off" else "float32", modules=len(names),
        input_finite=ok[0], loss=values[1], grad_norm=values[2],
        forward_producer=next((n for n, i, o, _ in fwd if i and not o), None),
        forward_nonfinite=not all(o for _, _, o, _ in fwd),
        backward_producer=next((n for n, go, gi in bwd if go and not gi), None),
        backward_nonfinite=not all(go and gi for _, go, gi in bwd) or not all(grad_ok),
        nonfinite_grads=[n for (n, _), good in zip(params, grad_ok) if not good],
        fp16_overflow=[f"{n} (|x| {m:.3g})" for n, _, o, m in fwd if o and m > FP16_MAX])


def check_nonfinite(report: NonFiniteReport, prefix: str, amp: str = "off") -> list[Check]:
    """PASS/FAIL lines for one NonFiniteReport: forward producer, backward producer, fp16 range."""
    tag = f"{prefix}.{report.precision}"
    if not report.input_finite:
        forward = judge(f"{tag}.forward", False, "the input batch itself holds NaN/Inf", "finite inputs",
                        "the data is the source: see batch.finite / data.finite", "data")
    else:
        where = (f"first non-finite output: {report.forward_producer} (its inputs are finite)"
                 if report.forward_producer else "the loss is non-finite on finite logits")
        ok = not report.forward_nonfinite and math.isfinite(report.loss)
        source = report.forward_producer or "the loss"
        fix = (f"{source} turns finite inputs into NaN/Inf: guard its log/sqrt/division/exp (clamp, add eps)"
               if report.precision == "float32" else f"{source} leaves the {report.precision} range (see "
               f"nan.fp16_range): use --amp bf16, or keep that module in float32")
        forward = judge(f"{tag}.forward", ok, f"all {report.modules} module outputs finite, loss {report.loss:.4g}"
                        if ok else where, "every module output finite", fix, "numerics")
    if forward.status != "PASS":
        backward = skip(f"{tag}.backward", "the forward pass is already non-finite")
    else:
        where = (report.backward_producer or
                 f"parameter gradients {show(report.nonfinite_grads)}")
        backward = judge(f"{tag}.backward", not report.backward_nonfinite,
                         f"all gradients finite, norm {report.grad_norm:.4g}" if not report.backward_nonfinite
                         else f"first non-finite input-gradient: {where}", "every gradient finite",
                         f"{where}: its backward divides by ~0 (sqrt/log/pow at 0): add an eps", "numerics")
    checks = [forward, backward]
    if report.precision == "float32":
        over = report.fp16_overflow
        checks.append(judge(f"{prefix}.fp16_range", not over,
                            f"{len(over)} modules exceed {FP16_MAX:g} {show(over)}".strip(),
                            f"|activation| <= {FP16_MAX:g} (fp16 max)", "these activations overflow under --amp "
                            "fp16: use --amp bf16, or normalise/scale them down", "numerics", warn=amp != "fp16"))
    return checks


# ---- overfit, input_dependence: can the setup learn at all ----
def check_overfit(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                  cfg: Config, max_steps: int = OVERFIT_MAX_STEPS) -> tuple[list[Check], nn.Module]:
    """Memorise OVERFIT_SAMPLES samples with the real train_step (AdamW at OVERFIT_LR, the run's clipping and
    guard); the loss must drop by OVERFIT_MIN_DROP. Fails on a model, loss or target that cannot be fitted."""
    model = copy.deepcopy(model)
    n = min(OVERFIT_SAMPLES, len(images))
    x, y, z = images[:n], masks[:n], labels[:n]
    recipe = Config(**{**cfg.to_dict(), "optimizer": "adamw", "base_lr": OVERFIT_LR, "weight_decay": 0.0})
    run = probe_run(model, loss_fn, recipe, images.device, warmup=OVERFIT_WARMUP_STEPS, steps=max_steps)
    losses, skipped, pending = [], 0, []
    for step in range(max_steps):
        pending.append(T.train_step(run, x, y, z)[[0, 4]])
        if (step + 1) % OVERFIT_CHECK_EVERY and step + 1 < max_steps:
            continue
        for loss, reason in torch.stack(pending).tolist():  # one host sync per OVERFIT_CHECK_EVERY steps
            losses.append(loss)
            skipped += int(reason != 0)
        pending = []
        recent = float(np.mean(losses[-5:]))
        if math.isfinite(losses[0]) and recent <= (1 - OVERFIT_MIN_DROP) * losses[0]:
            break
    first, last = losses[0], float(np.mean(losses[-5:]))
    drop = 1 - last / first if math.isfinite(first) and first > 0 else 0.0
    value = (f"loss {first:.4f} -> {last:.4f} ({drop:.0%} drop) in {len(losses)} steps on {n} samples "
             f"(AdamW lr {OVERFIT_LR:g})"
             + (f", {skipped} steps skipped by the guard" if skipped else ""))
    check = judge("overfit", math.isfinite(last) and drop >= OVERFIT_MIN_DROP, value,
                  f"drop >= {OVERFIT_MIN_DROP:.0%} within {max_steps} steps",
                  f"the model cannot memorise {n} samples: look for gradients that do not flow (grad.*), "
                  "targets the loss cannot reach (mask values, ignore_index), or a model too small to fit them",
                  "learning",
                  details={"losses": losses})
    return [check], model


def check_input_dependence(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                           loss_fn: nn.Module) -> list[Check]:
    """After overfitting, zeroed inputs must give a clearly worse loss than the real ones (eval mode)."""
    n = min(OVERFIT_SAMPLES, len(images))
    x, y, z = images[:n], masks[:n], labels[:n]
    model = copy.deepcopy(model)
    T.recalibrate_bn(model, [{"image": x}], 1, x.device)  # eval-mode statistics of exactly these inputs
    model.eval()
    with torch.no_grad():
        real = loss_fn(*model(x), y, z)[0]
        zero = loss_fn(*model(torch.zeros_like(x)), y, z)[0]
        real_v, zero_v = torch.stack([real, zero]).tolist()
    ratio = zero_v / real_v if real_v > 0 else math.inf
    return [judge("input_dependence", ratio >= INPUT_DEPENDENCE_MIN_RATIO,
                  f"loss {zero_v:.4f} with zeroed inputs vs {real_v:.4f} with real ones (x{ratio:.3g})",
                  f"zeroed >= {INPUT_DEPENDENCE_MIN_RATIO:g} x real",
                  "the model predicts as well without its input: the targets leak into the input, or "
                  "images and targets are not paired (check the dataset's file matching)", "learning")]


# ---- checkpoint: finite and fits the config ----
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw payload (load_checkpoint refuses non-finite weights, which this check must name), in today's
    layout."""
    try:
        payload = T.read_tagged(path, T.CHECKPOINT_FORMAT, "checkpoint", UsageError)
    except UsageError as err:
        raise UsageError(f"--checkpoint: {err}") from None
    T.upgrade_checkpoint(payload)
    return payload


def check_checkpoint(payload: dict[str, Any], path: str | Path, cfg: Config) -> tuple[list[Check], bool]:
    """All tensors finite (each named with its NaN/Inf counts), fits the current config; (checks, usable)."""
    bad = T.nonfinite_tensors({"model": payload["model"], "optimizer": payload.get("optimizer", {})})
    checks = [judge("checkpoint.finite", not bad, f"{len(bad)} non-finite tensors" + (f": {show(bad)}" if bad else ""),
                    "0", "do not resume from it: use an earlier finite checkpoint (best.pt) and find the source "
                    "with --batch / nan.*; the training script itself never writes a non-finite checkpoint",
                    "weights", details={"nonfinite": bad})]
    state = payload.get("state", {})
    progress = (f"epoch {state.get('epoch')}, step {state.get('step')}, best val mIoU "
                f"{state.get('best_miou', float('nan')):.4f} at epoch {state.get('best_epoch')}, "
                f"{sum(state.get('skipped', {}).values())} skipped steps")
    problem = ""
    try:  # first against its own settings: a checkpoint of an earlier model layout is named as such
        T.check_model_layout(path, payload)
        T.build_model(cfg, from_checkpoint=True).load_state_dict(payload["model"])
    except T.CheckpointError as err:
        problem = str(err)
    except RuntimeError as err:
        problem = " ".join(str(err).split())[:300]
    if not problem and not bad:
        try:
            T.load_checkpoint(path, cfg)
        except T.CheckpointError as err:
            problem = str(err)
    checks.append(judge("checkpoint.compatible", not problem, problem or f"fits the current config ({progress})",
                        "same classes and architecture as the current config",
                        "run with the checkpoint's config (its config.yaml, or --config) or retrain", "config"))
    return checks, not bad and not problem


# ---- bn: BatchNorm running statistics of trained weights ----
def score_batch(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
            loss_fn: nn.Module, cfg: Config) -> torch.Tensor:
    """[seg loss, cls loss, pixel acc, cls acc] of model as it is (train/eval mode untouched), on the device."""
    with torch.no_grad():
        seg, cls = model(images)
        _, parts = loss_fn(seg, cls, masks, labels)
        valid = masks != cfg.ignore_index
        pixel = ((seg.argmax(1) == masks) & valid).sum() / valid.sum().clamp_min(1)
        accuracy = (cls.argmax(1) == labels).float().mean()
    return torch.stack([parts["seg"], parts["cls"], pixel.float(), accuracy])


def _bn_distance(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Distance of a batch's statistics from the running ones, in running standard deviations (+ |log var ratio|)."""
    x = x.detach().float()
    dims = [0] + list(range(2, x.dim()))
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    running_var = module.running_var.float() + module.eps
    shift = ((mean - module.running_mean.float()).abs() / running_var.sqrt()).mean()
    return shift + ((var + module.eps) / running_var).log().abs().mean()


def check_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, ...]], loss_fn: nn.Module, cfg: Config,
                    loader: Iterable[dict[str, Any]] | None = None) -> list[Check]:
    """Same batches with BN on running statistics (eval) and on batch statistics: a large gap = stale/poisoned stats.

    batches: a few (images, masks, labels) training batches; several, so that accuracies are not a coin flip.
    """
    probe = copy.deepcopy(model)
    norms = [(n, m) for n, m in probe.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return [skip("bn.health", "no BatchNorm layers with running statistics")]
    probe.eval()
    running = torch.stack([score_batch(probe, *b, loss_fn, cfg) for b in batches]).mean(0)
    distances: dict[str, list[torch.Tensor]] = {n: [] for n, _ in norms}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: distances[n].append(_bn_distance(mod, args[0])))
               for n, m in norms]
    for _, module in norms:
        module.train()  # batch statistics; dropout stays off, so only BatchNorm differs
        module.momentum = 0.0  # and the running statistics stay as they are for the next batch's distance
    batch = torch.stack([score_batch(probe, *b, loss_fn, cfg) for b in batches]).mean(0)
    for handle in handles:
        handle.remove()
    mean_distance = torch.stack([torch.stack(d).mean() for d in distances.values()])
    values = torch.cat([running, batch, mean_distance]).tolist()  # one host sync
    (seg_e, cls_e, pix_e, acc_e), (seg_b, cls_b, pix_b, acc_b) = values[:4], values[4:8]
    by_layer = dict(zip(distances, values[8:]))
    furthest = sorted(by_layer.items(), key=lambda kv: -kv[1])[:3]
    ok = (seg_e <= BN_LOSS_RATIO_MAX * seg_b + BN_LOSS_SLACK and cls_e <= BN_LOSS_RATIO_MAX * cls_b + BN_LOSS_SLACK
          and pix_b - pix_e <= BN_ACC_DROP_MAX and acc_b - acc_e <= BN_ACC_DROP_MAX)
    images = sum(len(b[0]) for b in batches)
    value = (f"eval vs batch stats over {images} images: seg loss {seg_e:.3f}/{seg_b:.3f}, cls loss "
             f"{cls_e:.3f}/{cls_b:.3f}, pixel acc {pix_e:.2f}/{pix_b:.2f}, cls acc {acc_e:.2f}/{acc_b:.2f}; "
             f"furthest: " + ", ".join(f"{n} ({d:.2f})" for n, d in furthest))
    fix = (f"stale or poisoned running statistics: train with --bn-recalibrate {BN_RECALIBRATE_BATCHES} "
           f"(re-estimates them before each evaluation) or lower the BatchNorm momentum")
    if not ok and loader is not None:
        fixed = copy.deepcopy(model)
        T.recalibrate_bn(fixed, loader, BN_RECALIBRATE_BATCHES, batches[0][0].device)
        after = torch.stack([score_batch(fixed.eval(), *b, loss_fn, cfg) for b in batches]).mean(0).tolist()
        fix += (f"; tried here: after recalibrating over {BN_RECALIBRATE_BATCHES} batches, eval seg/cls loss "
                f"{after[0]:.3f}/{after[1]:.3f}, cls acc {after[3]:.2f}")
    far = furthest[0][1] > BN_DISTANCE_WARN
    if ok and far:
        fix = (f"{furthest[0][0]}'s running statistics are far from its batch statistics although predictions "
               f"agree so far: re-estimate them (--bn-recalibrate {BN_RECALIBRATE_BATCHES})")
    return [judge("bn.health", ok and not far, value, f"eval loss <= {BN_LOSS_RATIO_MAX:g} x batch-stat loss + "
                  f"{BN_LOSS_SLACK:g}, acc drop <= {BN_ACC_DROP_MAX:g}, distance <= {BN_DISTANCE_WARN:g}", fix,
                  "batchnorm", warn=ok, details={"distances": by_layer})]


# ---- run: how a run folder's run went ----
METRICS_NEEDED = ("epoch", "lr", "train_loss", "skipped_steps", "val_loss", "val_miou", "val_cls_acc")


@dataclass
class RunRecord:
    """What a run folder holds."""

    path: Path
    rows: list[dict[str, str]] | None  # metrics.csv, None when no epoch finished
    events: list[dict[str, Any]]  # steps.jsonl
    config: dict[str, Any]  # config.yaml ({} when absent)
    bad_batches: list[str]


def read_run_folder(path: str | Path) -> RunRecord:
    """Read metrics.csv, steps.jsonl, config.yaml; raise UsageError naming an unreadable file."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--run: {path} is not a folder")
    rows = None
    if (path / "metrics.csv").is_file():
        rows = read_metrics(path / "metrics.csv")
        missing = [c for c in METRICS_NEEDED if rows and c not in rows[0]]
        if missing:
            raise UsageError(f"--run: {path / 'metrics.csv'} lacks columns {missing}: "
                             f"not a metrics file of this script")
    events = []
    if (path / "steps.jsonl").is_file():
        for number, line in enumerate((path / "steps.jsonl").read_text().splitlines(), 1):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                raise UsageError(f"--run: {path / 'steps.jsonl'} line {number} is not JSON") from None
    settings = {}
    if (path / "config.yaml").is_file():
        try:
            settings = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"--run: {path / 'config.yaml'} is not valid YAML: {err}") from None
    bad = sorted(str(p) for p in (path / "bad_batches").glob("*.pt")) if (path / "bad_batches").is_dir() else []
    return RunRecord(path, rows, events, settings, bad)


SKIP_FIXES = {
    "non-finite loss": "NaN/Inf losses: replay a skipped batch with --batch and read nan.forward; check the data",
    "non-finite gradient": "NaN/Inf gradients on finite losses: see nan.backward; under fp16 try --amp bf16",
    "gradient explosion": "pre-clip gradient norms above skip_grad_norm: lower --base-lr (see grad.norm, "
                          "update.ratio), or raise --skip-grad-norm if such norms are normal for this model",
    "gradient spike": "gradient spikes against the running median: lower --base-lr or raise --grad-spike-factor",
    "loss spike": "loss spikes against the running median: look for bad samples (--batch) or raise "
                  "--loss-spike-factor",
}


def skipped_per_epoch(events: list[dict[str, Any]]) -> dict[int, tuple[int, int, Counter]]:
    """epoch (1-based) -> (skipped, steps, reasons) from steps.jsonl.

    steps is the epoch's length, the training script's max_skip_fraction denominator: the end event's
    steps_per_epoch, so that an epoch the run aborted in reads "10/16" as the abort message does. Runs
    written before that field: the steps the log lines (and skips) account for in that epoch.
    """
    ends: dict[int, int] = {}
    for event in events:
        if event.get("event") == "log":
            ends[event["epoch"]] = max(ends.get(event["epoch"], 0), event["step"])
        elif event.get("event") == "skip":  # an abort can come before the interval's log line
            ends[event["epoch"]] = max(ends.get(event["epoch"], 0), event["step"] + 1)
    reasons: dict[int, Counter] = {}
    for event in events:
        if event.get("event") == "skip":
            reasons.setdefault(event["epoch"], Counter())[event["reason"]] += 1
    length = next((e.get("steps_per_epoch") for e in reversed(events) if e.get("event") == "end"), None)
    result, previous = {}, 0
    for epoch in sorted(ends):
        found = reasons.get(epoch, Counter())
        result[epoch + 1] = (sum(found.values()), length or ends[epoch] - previous, found)
        previous = ends[epoch]
    return result


def run_end(record: RunRecord) -> dict[str, Any] | None:
    """The run's `end` event (its last record when it ended by itself), or None."""
    ends = [e for e in record.events if e.get("event") == "end"]
    return ends[-1] if ends else None


def check_run(record: RunRecord, cfg: Config, baselines: Baselines | None = None) -> list[Check]:
    """Outcome, verdict against the data's baselines, skipped-step ratio per epoch, LR floor, stuck val metrics,
    loss trend. Baselines come from the end event, else from `baselines` (computed from the data)."""
    checks = [check_run_outcome(record)]
    max_skip = min(float(record.config.get("max_skip_fraction", cfg.max_skip_fraction)), RUN_SKIP_FAIL_FRACTION)
    per_epoch = skipped_per_epoch(record.events)
    if not per_epoch:
        checks.append(skip("run.skipped", f"no step records in {record.path / 'steps.jsonl'}"))
    else:
        ratios = {e: s / max(n, 1) for e, (s, n, _) in per_epoch.items()}
        reasons = sum((r for _, _, r in per_epoch.values()), Counter())
        worst = sorted(ratios, key=lambda e: -ratios[e])[:3]
        value = ", ".join(f"epoch {e}: {per_epoch[e][0]}/{per_epoch[e][1]} ({ratios[e]:.0%})" for e in sorted(worst))
        if reasons:
            value += "; " + ", ".join(f"{r} x{n}" for r, n in reasons.most_common())
        fix = SKIP_FIXES.get(reasons.most_common(1)[0][0], "") if reasons else ""
        if record.bad_batches:
            fix += f"; replay one: --batch {record.bad_batches[-1]}"
        checks.append(judge("run.skipped", max(ratios.values()) <= RUN_SKIP_WARN_FRACTION, value,
                            f"0 skipped (FAIL above {max_skip:.0%})", fix, "run",
                            warn=max(ratios.values()) <= max_skip, details={"per_epoch": ratios}))
    if not record.rows:
        return checks + [judge("run.metrics", False, f"no epoch row in {record.path / 'metrics.csv'}",
                               "at least one epoch row", "no epoch finished: see run.outcome", "run")]
    end = run_end(record)
    if end and end.get("baselines"):
        baselines = Baselines(**end["baselines"])
    run_cfg = Config(**{**cfg.to_dict(), **{k: v for k, v in record.config.items() if k in cfg.to_dict()}})
    if baselines is None:
        checks.append(skip("run.learned", "no baselines: the run has no end event and the data could not be read"))
    else:
        rows = [{k: float(v) if v not in (None, "") else math.nan for k, v in r.items()} for r in record.rows]
        checks += check_learning(rows, baselines, run_cfg)
    return checks + check_run_metrics(record.rows, float(record.config.get("min_lr", cfg.min_lr)))


# What the training script's verdict names as the likely cause -> the cause of the ranked summary.
VERDICT_CAUSES = {"lr": "lr", "memorising": "generalization", "too_few_steps": "config", "no_signal": "learning"}


def check_learning(rows: list[dict[str, float]], baselines: Baselines, cfg: Config) -> list[Check]:
    """run.learned (the training script's own verdict), run.generalization, run.loss_vs_uniform."""
    verdicts = T.judge_learning(rows, baselines, cfg)
    failed = [v for v in verdicts.values() if v.verdict in ("did not learn", "memorising")]
    kind = failed[0].kind if failed else ""
    checks = [judge("run.learned", not failed, "; ".join(v.line() for v in verdicts.values()),
                    f"best val metric >= baseline + {T.LEARNED_MARGIN:g} x (1 - baseline) (accuracy: and 2 standard "
                    f"errors), train loss below a uniform guess", failed[0].cause if failed else "", VERDICT_CAUSES.get(kind, "run"),
                    details={head: asdict(v) for head, v in verdicts.items()})]
    last = rows[-1]
    cls_gap = last["train_cls_acc"] - last["val_cls_acc"]
    # Two standard errors of the val accuracy on top: on 8 val images one image is 0.125 of accuracy.
    p, n = last["val_cls_acc"], max(baselines.val_images, 1)
    allowed = GENERALIZATION_MAX_GAP + 2 * math.sqrt(max(p * (1 - p), 0.25 / n) / n)
    seg_ratio = last["val_seg_loss"] / max(last["train_seg_loss"], 1e-12)
    checks.append(judge("run.generalization", cls_gap <= allowed and seg_ratio <= T.MEMORISING_LOSS_RATIO,
                        f"last epoch: cls acc train {last['train_cls_acc']:.4f} vs val {last['val_cls_acc']:.4f} "
                        f"({baselines.val_images} val images); seg loss val/train {seg_ratio:.2f}",
                        f"cls acc gap <= {allowed:.3g} ({GENERALIZATION_MAX_GAP:g} + 2 standard errors), seg val/train "
                        f"loss <= {T.MEMORISING_LOSS_RATIO:g}",
                        "the model fits the training set far better than new images: add augmentation or data, "
                        "raise --weight-decay, or train fewer epochs", "generalization"))
    warm = [r for r in rows if r["epoch"] > config.effective_warmup_epochs(cfg)] or rows[-1:]
    best = min((r["train_loss"] for r in warm if math.isfinite(r["train_loss"])), default=math.nan)
    checks.append(judge("run.loss_vs_uniform", best < baselines.uniform_loss,
                        f"lowest train loss after warm-up {best:.4f}, uniform guess {baselines.uniform_loss:.4f}",
                        "below the loss of a uniform guess", f"the model never did better than guessing: the learning "
                        f"rate (base_lr {cfg.base_lr:g}) is probably too high; try --base-lr {cfg.base_lr / 10:g} "
                        f"(see update.ratio)", "lr"))
    return checks


# What to do about a failed run, by the `failure` of its end event (older runs have none: training).
FAILURE_FIXES = {
    "training": "the run stopped: see the causes ranked above and the skipped-step reasons",
    "input": "a setting or the data was refused (exit 2): the reason names the key or file; fix it and start again",
    "out_of_memory": "the device ran out of memory: lower batch_size or image_size (or train in bf16) and start again",
    "crash": "an unforeseen error, likely a bug: its traceback is in the terminal or the job's log (train.log "
             "stops before it); report it with the command and the run's config.yaml",
}


def check_run_outcome(record: RunRecord) -> Check:
    """How the run ended, from its `end` event: finished, stopped early, failed, stopped by a signal, or unknown."""
    end = run_end(record)
    if end is None:
        return judge("run.outcome", False, "unknown (no end event: the run was killed, or is still going)",
                     "the run ended by itself", "the run is still going, or was killed (out of memory? SIGKILL?): "
                     "resume it with --resume <run>/last.pt", "run", warn=True)
    outcome, reason = end.get("outcome", "?"), str(end.get("reason", ""))
    value = f"{outcome} after {end.get('epochs_done')} epoch(s), step {end.get('step')}: {reason[:300]}"
    if outcome == "failed":
        return judge("run.outcome", False, value, "the run finished",
                     FAILURE_FIXES.get(end.get("failure"), FAILURE_FIXES["training"]), "run")
    if outcome == "stopped":
        return judge("run.outcome", False, value, "the run finished", "stopped by a signal: resume it with "
                     "--resume <run>/last.pt", "run", warn=True)
    return judge("run.outcome", True, value, "the run finished (whether it learned: run.learned)", "", "run")


def check_run_metrics(rows: list[dict[str, str]], min_lr: float) -> list[Check]:
    epochs = [int(float(e)) for e in column(rows, "epoch")]
    val = {k: column(rows, k) for k in ("val_loss", "val_miou", "val_cls_acc")}
    nonfinite = [e for e, v in zip(epochs, val["val_loss"]) if not math.isfinite(v)]
    low_lr = [f"{e} ({lr:.3g})" for e, lr in zip(epochs, column(rows, "lr")) if lr < min_lr * (1 - 1e-9)]
    miou, acc = val["val_miou"], val["val_cls_acc"]
    zero = all(v == 0 for v in miou) or all(v == 0 for v in acc)
    flat = len(rows) >= 3 and len(set(miou)) == 1
    train = [(e, v) for e, v in zip(epochs, column(rows, "train_loss")) if math.isfinite(v)]
    checks = [
        judge("run.val_finite", not nonfinite, f"non-finite val loss in epochs {nonfinite}" if nonfinite else
              f"{len(rows)} epochs, val loss finite", "finite every epoch",
              "the weights went non-finite: see checkpoint.finite and the skipped steps", "run"),
        judge("run.lr_floor", not low_lr, f"lr below min_lr {min_lr:g} in epochs {show(low_lr)}" if low_lr else
              f"lr >= min_lr {min_lr:g}", "lr >= min_lr every epoch", "see lr.schedule", "lr"),
        judge("run.val_stuck", not zero and not flat, f"val mIoU {show_values(set(miou))}, val cls acc "
              f"{show_values(set(acc))}", "not all 0, not constant over >= 3 epochs",
              "validation never changes: the model predicts one class (see run.skipped, overfit, bn.health)",
              "run", warn=not zero),
    ]
    if len(train) < 2:
        checks.append(skip("run.loss_trend", f"{len(train)} epochs with a finite train loss"))
    else:
        (e0, first), (e1, last) = train[0], train[-1]
        checks.append(judge("run.loss_trend", last <= first * (1 + RUN_LOSS_RISE_MAX),
                            f"train loss {first:.4f} (epoch {e0}) -> {last:.4f} (epoch {e1})",
                            f"last <= first x {1 + RUN_LOSS_RISE_MAX:g}", "the loss goes up: lower --base-lr "
                            "(see update.ratio) or look for bad data (run.skipped)", "lr"))
    return checks


# ---- bad_batch: replay a batch the guard skipped ----
def read_bad_batch(path: str | Path) -> dict[str, Any]:
    try:
        return T.load_bad_batch(path)
    except DataError as err:
        raise UsageError(f"--batch: {err}") from None


def bad_batch_verdict(data_failed: list[Check], bad_weights: list[str], fp32: NonFiniteReport | None,
                      amp: NonFiniteReport | None, payload: dict[str, Any], cfg: Config) -> Check:
    """Data, weights, numerics or gradients: the first that explains the skipped step."""
    rule = "data, weights and float32/AMP replay all clean"
    if data_failed:
        return judge("bad_batch.verdict", False, "the data: " + "; ".join(f"{c.name} {c.value}" for c in data_failed),
                     rule, f"fix or drop samples {show(list(payload.get('ids', [])))}: {data_failed[0].fix}", "data")
    if bad_weights:
        return judge("bad_batch.verdict", False, f"the weights: {show(bad_weights)}", rule,
                     f"the weights of step {payload.get('weights_step')} were already non-finite: resume from an "
                     f"earlier checkpoint with a lower --base-lr", "weights")
    broken = lambda r: r is not None and (r.forward_nonfinite or r.backward_nonfinite or not math.isfinite(r.loss))
    if broken(fp32):
        where = fp32.forward_producer or fp32.backward_producer or "the loss"
        return judge("bad_batch.verdict", False, f"numerics in float32: first non-finite at {where}", rule,
                     f"{where} produces NaN/Inf on finite inputs and weights: add an eps/clamp", "numerics")
    if broken(amp):
        where = amp.forward_producer or amp.backward_producer or "the loss"
        return judge("bad_batch.verdict", False, f"numerics: finite in float32, not in {amp.precision} "
                     f"(first at {where})", rule, f"{where} overflows in {amp.precision}: use --amp bf16 or "
                     f"keep that module in float32", "numerics")
    if fp32 is not None and fp32.grad_norm > cfg.skip_grad_norm:
        return judge("bad_batch.verdict", False, f"gradient explosion reproduced: norm {fp32.grad_norm:.4g} > "
                     f"skip_grad_norm {cfg.skip_grad_norm:g}", rule, SKIP_FIXES["gradient explosion"], "gradients")
    return judge("bad_batch.verdict", False, f"not reproduced: loss {fp32.loss:.4g}, grad norm {fp32.grad_norm:.4g} "
                 f"(saved: {payload.get('reason')}, loss {payload.get('loss')}, grad norm {payload.get('grad_norm')})",
                 rule, f"the weights are from step {payload.get('weights_step')}, the batch from step "
                 f"{payload.get('step')}: the step that failed had other weights; check the spike settings",
                 "run", warn=True)


def check_bad_batch(payload: dict[str, Any], cfg: Config, device: torch.device) -> list[Check]:
    """Replay a saved batch in float32 and in its run's precision: is it the data, the numerics or the weights?"""
    run_cfg = Config(**{**cfg.to_dict(), **payload.get("config", {})})
    batch = {"image": payload["images"], "mask": payload["masks"], "label": payload["labels"],
             "id": payload.get("ids", [])}
    data = check_batch(batch, run_cfg, prefix="bad_batch")
    data_failed = [c for c in data if c.status == "FAIL"]
    bad_weights = T.nonfinite_tensors(payload["model"])
    checks = data + [judge("bad_batch.weights", not bad_weights, f"{len(bad_weights)} non-finite tensors"
                           + (f": {show(bad_weights)}" if bad_weights else ""), "0",
                           "the weights were already broken before this batch", "weights")]
    model = T.build_model(run_cfg, from_checkpoint=True).to(device)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        return checks + [judge("bad_batch.replay", False, " ".join(str(err).split())[:300], "weights fit the model",
                               "diagnose with the run's config (--config runs/X/config.yaml)", "config")]
    images, masks, labels = (payload[k].to(device) for k in ("images", "masks", "labels"))
    loss_fn = T.build_loss(run_cfg).to(device)
    fp32 = amp = None
    if loss_safe(masks, labels, run_cfg):
        fp32 = find_nonfinite(model, images, masks, labels, loss_fn)
        checks += check_nonfinite(fp32, "bad_batch.nan", payload.get("amp", "off"))
        if payload.get("amp", "off") != "off":
            amp = find_nonfinite(model, images, masks, labels, loss_fn, payload["amp"])
            checks += check_nonfinite(amp, "bad_batch.nan", payload["amp"])
    else:
        checks.append(skip("bad_batch.nan", "mask or label values out of range would crash the loss"))
    return checks + [bad_batch_verdict(data_failed, bad_weights, fp32, amp, payload, run_cfg)]


def loss_safe(masks: torch.Tensor, labels: torch.Tensor, cfg: Config) -> bool:
    """True when cross-entropy can run: every mask value a class or ignore_index, every label a class."""
    values = masks.unique().cpu().numpy()
    labels_ok = bool(((labels >= 0) & (labels < cfg.num_cls_classes)).all())
    return labels_ok and invalid_mask_values(values, cfg.num_seg_classes, cfg.ignore_index).size == 0


# ---- Running it ----
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diagnose_training.py", allow_abbrev=False, description=__doc__.splitlines()[0],
                     epilog="Every training flag works here too (python train_enhanced_adaptivestream.py --help), "
                            "e.g. --config my.yaml --image-size 64 --amp bf16.")
    parser.add_argument("--run", metavar="DIR", help="run folder to read (metrics.csv, steps.jsonl, train.log); "
                        "its config.yaml is the config unless --config is given")
    parser.add_argument("--checkpoint", metavar="FILE.pt", help="checkpoint to check (finite, fits the config); "
                        "its weights are used for the BatchNorm check")
    parser.add_argument("--batch", metavar="FILE.pt", help="bad-batch file saved by the training loop: replay it; "
                        "its run's config.yaml (above bad_batches/) is the config unless --config or --run is given")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help=f"check {QUICK_SCAN_SAMPLES} samples per split and "
                        "skip the overfit and input-dependence tests")
    parser.add_argument("--autocast", choices=("bf16", "fp16"), help="also run the NaN finder under this autocast "
                        "dtype (default: the config's --amp)")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """Own flags first; everything else goes to load_config, so every training flag works."""
    parser = build_parser()
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    options.run_config = None
    # The run the files came from: --run, or the folder above a bad batch's bad_batches/ (its batch was
    # made by that run's config: image size, classes, normalisation).
    batch = Path(options.batch) if options.batch else None
    run_dir = options.run or (batch.parent.parent if batch and batch.parent.name == "bad_batches" else None)
    if run_dir and not any(a == "--config" or a.startswith("--config=") for a in rest):
        run_config = Path(run_dir) / "config.yaml"
        if run_config.is_file():
            rest = ["--config", str(run_config), *rest]
            options.run_config = str(run_config)
    try:
        cfg = load_config(rest, prog="diagnose_training.py", own_flags=parser_flags(parser))
    except ConfigError as err:
        if str(err).startswith("unknown flag"):
            raise ConfigError(f"{err} (this script's own flags: --run --checkpoint --batch --json --quick "
                              f"--autocast)") from None
        raise
    if options.json and not Path(options.json).resolve().parent.is_dir():
        raise UsageError(f"--json: folder {Path(options.json).parent} does not exist")
    return options, cfg


@dataclass
class Inputs:
    """Files named on the command line, read before any check runs (so a bad path exits 2 at once)."""

    run: RunRecord | None = None
    checkpoint: dict[str, Any] | None = None
    bad_batch: dict[str, Any] | None = None


def read_inputs(options: argparse.Namespace) -> Inputs:
    return Inputs(run=read_run_folder(options.run) if options.run else None,
                  checkpoint=read_checkpoint(options.checkpoint) if options.checkpoint else None,
                  bad_batch=read_bad_batch(options.batch) if options.batch else None)


@dataclass
class Setup:
    """The real datasets, train loader and its first batch, as build_datasets / build_loaders make them."""

    splits: dict[str, Dataset] | None = None
    loader: Any = None
    batch: dict[str, Any] | None = None
    error: str = ""


def build_setup(cfg: Config, device: torch.device) -> Setup:
    try:
        train_ds, val_ds = build_datasets(cfg)
    except DataError as err:
        return Setup(error=f"build_datasets: {err}")
    setup = Setup(splits={"train": train_ds, "val": val_ds})
    try:
        setup.loader, _ = build_loaders(cfg, train_ds, val_ds, device)
        setup.batch = next(iter(setup.loader))
    except (DataError, OSError) as err:
        setup.error = str(err)
    return setup


class Reporter:
    """Prints each check as it finishes (a full run takes minutes) and keeps them for the summary."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def add(self, checks: list[Check]) -> list[Check]:
        for check in checks:
            print(check.line(), flush=True)
            self.checks.append(check)
        return checks

    def skip(self, names: Iterable[str], why: str) -> None:
        self.add([skip(name, why) for name in names])


def diagnose_model(model: nn.Module, tensors: tuple[torch.Tensor, ...], cfg: Config, out: Reporter) -> bool:
    """The model, loss, grad and update checks; True when forward and loss work, so the later checks can run."""
    images, masks, labels = tensors
    later = ("grad", "update.ratio")
    if any(c.status == "FAIL" and c.name in ("model.forward", "model.heads")
           for c in out.add(check_model(model, images, masks, cfg))):
        out.skip(later, "the forward pass does not give usable logits (see model.*)")
        return False
    if not loss_safe(masks, labels, cfg):
        out.skip(("loss.init",) + later, "mask or label values out of range would crash the loss (see batch.*)")
        return False
    if any(c.name == "loss.init" for c in out.add(check_initial_loss(model, images, masks, labels, T.build_loss(cfg)
                                                                        .to(images.device), cfg))):
        out.skip(later, "the loss cannot be computed (see loss.init)")
        return False
    loss_fn = T.build_loss(cfg).to(images.device)
    out.add(check_gradients(model, images, masks, labels, loss_fn, cfg))
    out.add(check_update_ratio(model, images, masks, labels, loss_fn, cfg))
    return True


def diagnose_learning(model: nn.Module, tensors: tuple[torch.Tensor, ...], cfg: Config,
                      options: argparse.Namespace, out: Reporter) -> None:
    """The nan checks (float32, and the AMP dtype when asked), then overfit and input_dependence."""
    loss_fn = T.build_loss(cfg).to(tensors[0].device)
    out.add(check_nonfinite(find_nonfinite(model, *tensors, loss_fn), "nan", cfg.amp))
    amp = options.autocast or cfg.amp
    if amp != "off":
        out.add(check_nonfinite(find_nonfinite(model, *tensors, loss_fn, amp), "nan", amp))
    if options.quick:
        out.skip(("overfit", "input_dependence"), "--quick")
        return
    checks, trained = check_overfit(model, *tensors, loss_fn, cfg)
    out.add(checks)
    out.add(check_input_dependence(trained, *tensors, loss_fn))


def diagnose(cfg: Config, options: argparse.Namespace, inputs: Inputs, out: Reporter) -> None:
    """Every check, in the report's order."""
    device = T.use_device(cfg.device)
    if cfg.amp == "auto":  # as the training run resolves it (build_run), so the checks see the same precision
        cfg.amp, why = T.resolve_amp(cfg.amp, device)
        print(f"amp auto -> {cfg.amp} ({why})", flush=True)
    T.seed_everything(cfg.seed)
    setup = build_setup(cfg, device)
    out.add(check_config(cfg, len(setup.splits["train"]) if setup.splits else None,
                         len(setup.loader) if setup.loader is not None else None))
    if setup.splits:
        out.add(check_data(setup.splits, cfg, QUICK_SCAN_SAMPLES if options.quick else None))
    if setup.error:
        out.add([judge("data.build", False, setup.error, "datasets, loader and one batch build",
                       "fix or remove the files named in the message", "data")])
    model, ready = T.build_model(cfg).to(device), False
    if setup.batch is not None:
        out.add(check_batch(setup.batch, cfg))
        tensors = batch_tensors(setup.batch, cfg, device)
        ready = diagnose_model(model, tensors, cfg, out)
    if setup.loader is not None:
        out.add(check_lr_schedule(cfg, len(setup.loader)))
    else:
        out.skip(("lr.schedule",), "steps per epoch unknown: no training loader (see data.build)")
    if ready:
        diagnose_learning(model, tensors, cfg, options, out)
    else:
        out.skip(("nan", "overfit", "input_dependence"), "needs a working forward pass and loss")
    # BatchNorm health needs the run's trained statistics: a fresh model has the init values (0, 1), and the
    # overfit test's model (a fast memorisation recipe) has statistics that lag its weights by design.
    usable = False
    if inputs.checkpoint is not None:
        checks, usable = check_checkpoint(inputs.checkpoint, options.checkpoint, cfg)
        out.add(checks)
    if usable and ready:
        trained_model = T.build_model(cfg, from_checkpoint=True).to(device)
        trained_model.load_state_dict(inputs.checkpoint["model"])
        batches = [batch_tensors(b, cfg, device) for b in itertools.islice(setup.loader, BN_CHECK_BATCHES)]
        out.add(check_batchnorm(trained_model, batches, T.build_loss(cfg).to(device), cfg, setup.loader))
    else:
        out.skip(("bn.health",), "needs a working forward pass and loss" if not ready else
                 "needs trained weights: pass --checkpoint runs/X/last.pt" if inputs.checkpoint is None else
                 "the checkpoint is not usable (see checkpoint.*)")
    if inputs.run is not None:
        baselines = data_baselines(cfg, *setup.splits.values()) if setup.splits else None
        out.add(check_run(inputs.run, cfg, baselines))
    if inputs.bad_batch is not None:
        out.add(check_bad_batch(inputs.bad_batch, cfg, device))


def header(cfg: Config, options: argparse.Namespace) -> str:
    defaults = {name.lower(): default for name, (_, default, _) in config.settings().items()}
    changed = {k: v for k, v in cfg.to_dict().items() if defaults.get(k) != v}
    source = f" (from {options.run_config} and the flags)" if options.run_config else ""
    return (f"diagnose_training.py ({'quick' if options.quick else 'full'}) | resolved config{source}, settings "
            f"that differ from config.py: {changed or 'none'}")


def _jsonable(value: Any) -> Any:
    """Plain JSON (no NaN/Infinity tokens, which strict parsers reject): non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str, checks: list[Check], cfg: Config, options: argparse.Namespace, code: int,
               seconds: float) -> None:
    report = {"exit_code": code, "mode": "quick" if options.quick else "full", "seconds": round(seconds, 1),
              "config": cfg.to_dict(), "checks": [asdict(c) for c in checks], "root_causes": ranked_causes(checks)}
    Path(path).write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    try:
        options, cfg = parse_args(argv)
        inputs = read_inputs(options)
        T.resolve_device(cfg.device)
    except (UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(header(cfg, options), flush=True)
    out = Reporter()
    try:
        diagnose(cfg, options, inputs, out)
    except ConfigError as err:  # e.g. a dataset this version of the training script does not have
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception:  # a crash is not a diagnosis: say so, loudly, with exit code 2 (not 1, "a check failed")
        traceback.print_exc()
        print("error: diagnose_training.py could not finish (traceback above); the checks printed so far stand",
              file=sys.stderr)
        return 2
    code = 1 if any(c.status == "FAIL" for c in out.checks) else 0
    print(format_summary(out.checks))
    seconds = time.perf_counter() - start
    print(f"exit code {code} ({seconds:.1f} s)")
    if options.json:
        write_json(options.json, out.checks, cfg, options, code, seconds)
    return code


if __name__ == "__main__":
    sys.exit(main())
