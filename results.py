"""What people look at: prediction grids, overlays, training curves, TensorBoard, metrics.csv.

Callers hand in an unwrapped model (never a DistributedDataParallel wrapper) and only rank 0 calls
these. This module imports nothing from the training script.
"""

from __future__ import annotations

import colorsys
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_segmentation_masks, make_grid

from config import Config, ConfigError
from data import IMAGENET_MEAN, IMAGENET_STD, class_names

log = logging.getLogger("adaptivestream")

VIS_MIN_PANEL = 128  # grid panels are upscaled (nearest, whole pixels) to at least this side
VIS_PAD = 2  # white pixels between panels and tiles
CAPTION_HEIGHT = 28  # two text lines under each image's three panels
LINE_HEIGHT = 14
LEGEND_CELL = 120  # width of one legend entry (swatch + class name)
CURVES_INCHES, CURVES_DPI = (12, 7), 100  # curves.png is 1200 x 700 pixels
_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
_STEP_SCALARS = ("loss", "seg_loss", "cls_loss", "grad_norm", "lr", "skipped_epoch", "images_per_s")


METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_seg_loss", "train_cls_loss", "train_cls_acc", "skipped_steps",
                  "fp16_overflows", "rollbacks", "val_loss", "val_seg_loss", "val_cls_loss", "val_miou", "val_pixel_acc", "val_cls_acc",
                  "val_cls_f1", "seconds"]


def write_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row to metrics.csv (the header first, on a new file)."""
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv as written by write_metrics_row."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """One metrics.csv column as floats; NaN where a row has no value."""
    return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]


def seg_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """One RGB colour per segmentation class; entry 0 (background) is never painted."""
    colours = _PALETTE[:num_classes]
    for i in range(len(colours), num_classes):  # beyond the table: hues a golden-ratio step apart
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)))
    return colours


def overlay_mask(image: torch.Tensor, mask: torch.Tensor, palette: list[tuple[int, int, int]]) -> torch.Tensor:
    """uint8 image [3, H, W] with classes 1.. of mask [H, W] painted at 50%; background and ignored pixels stay."""
    classes = torch.arange(1, len(palette))
    masks = mask.cpu()[None] == classes[:, None, None]  # [S-1, H, W] bool
    return draw_segmentation_masks(image.cpu(), masks, alpha=0.5, colors=palette[1:])


def denormalize(images: torch.Tensor, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """Normalised float images [..., 3, H, W] back to uint8 for display."""
    mean_t, std_t = torch.tensor(list(mean))[:, None, None], torch.tensor(list(std))[:, None, None]
    return (images.cpu().float() * std_t + mean_t).clamp(0, 1).mul(255).round().to(torch.uint8)


def _text_strip(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    strip = Image.new("RGB", (width, height), "white")
    return strip, ImageDraw.Draw(strip)


def caption_below(tile: torch.Tensor, lines: list[str]) -> torch.Tensor:
    strip, draw = _text_strip(tile.shape[-1], CAPTION_HEIGHT)
    for j, line in enumerate(lines):
        draw.text((VIS_PAD + 2, j * LINE_HEIGHT), line, fill="black")
    return torch.cat([tile, pil_to_tensor(strip)], dim=1)


def add_legend(grid: torch.Tensor, seg_names: list[str], palette: list[tuple[int, int, int]],
               title: str) -> torch.Tensor:
    """A strip above the grid: the title, the column order, and one swatch per segmentation class."""
    width = grid.shape[-1]
    per_row = max(1, (width - 2 * VIS_PAD) // LEGEND_CELL)
    rows = -(-len(seg_names) // per_row)
    strip, draw = _text_strip(width, LINE_HEIGHT * (rows + 1) + 2 * VIS_PAD)
    draw.text((VIS_PAD, VIS_PAD), f"{title}   columns: image | ground truth | prediction", fill="black")
    for k, name in enumerate(seg_names):
        x, y = VIS_PAD + (k % per_row) * LEGEND_CELL, VIS_PAD + LINE_HEIGHT * (1 + k // per_row)
        label = f"{name} (not painted)" if k == 0 else name
        while len(label) > 1 and draw.textlength(label) > LEGEND_CELL - 20:
            label = label[:-1]
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=None if k == 0 else palette[k], outline="black")
        draw.text((x + 14, y), label, fill="black")
    return torch.cat([pil_to_tensor(strip), grid], dim=1)


@torch.no_grad()
def draw_prediction_grid(model: nn.Module, dataset: Dataset, names: dict[str, list[str]], count: int,
                         device: torch.device, title: str) -> torch.Tensor:
    """uint8 [3, H, W]: for each of the first `count` samples, image | truth overlay | prediction overlay,
    with the true and predicted class and its confidence under it; two images per row; legend on top."""
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([s["image"] for s in samples])  # [N, 3, H, W], normalised as in training
    masks = torch.stack([torch.as_tensor(s["mask"]) for s in samples]).long()  # [N, H, W]
    was_training = model.training
    model.eval()
    seg_logits, cls_logits = model(images.to(device))
    model.train(was_training)
    preds = seg_logits.argmax(1).cpu()  # [N, H, W]
    confidence, predicted = cls_logits.float().softmax(1).max(1)
    confidence, predicted = confidence.cpu().tolist(), predicted.cpu().tolist()
    palette = seg_palette(len(names["seg"]))
    shown = denormalize(images, IMAGENET_MEAN, IMAGENET_STD)
    scale = max(1, -(-VIS_MIN_PANEL // max(images.shape[-2:])))
    tiles = []
    for i, sample in enumerate(samples):
        panels = torch.stack([shown[i], overlay_mask(shown[i], masks[i], palette),
                              overlay_mask(shown[i], preds[i], palette)])  # [3 panels, 3, H, W]
        panels = panels.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        caption = [f"true: {names['cls'][int(sample['label'])]}",
                   f"pred: {names['cls'][predicted[i]]} ({confidence[i]:.2f})"]
        tiles.append(caption_below(make_grid(panels, nrow=3, padding=VIS_PAD, pad_value=255), caption))
    grid = make_grid(tiles, nrow=min(2, len(tiles)), padding=VIS_PAD, pad_value=255)
    return add_legend(grid, names["seg"], palette, title)


def save_png(image: torch.Tensor | Image.Image, path: Path) -> None:
    """Write atomically, so a viewer refreshing the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image.permute(1, 2, 0).numpy())
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)


def draw_curves(metrics_csv: Path, out: Path) -> None:
    """curves.png from metrics.csv: losses, val metrics, learning rate (log scale), skipped steps."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_csv)
    epochs = column(rows, "epoch")
    fig = Figure(figsize=CURVES_INCHES, dpi=CURVES_DPI)
    axes = fig.subplots(2, 3).ravel()
    # Fixed margins: layout="constrained" re-solves the layout and doubled the redraw time (0.6 -> 1.2 s).
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.95, wspace=0.25, hspace=0.35)
    panels = [("loss", ["train_loss", "val_loss"]),
              ("loss per head", ["train_seg_loss", "val_seg_loss", "train_cls_loss", "val_cls_loss"]),
              ("segmentation (val)", ["val_miou", "val_pixel_acc"]),
              ("classification", ["train_cls_acc", "val_cls_acc", "val_cls_f1"]), ("learning rate", ["lr"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(epochs, column(rows, key), marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[4].set_yscale("log")
    axes[5].bar(epochs, column(rows, "skipped_steps"), color="tab:red")
    axes[5].set_title("skipped steps")
    axes[5].set_ylim(0, max([1.0] + [v for v in column(rows, "skipped_steps") if not math.isnan(v)]) * 1.1)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)


class ResultsRecorder:
    """Per-epoch outputs a person looks at: vis/epoch_<N>.png, curves.png and TensorBoard.

    active=False (ranks > 0 under torchrun) makes every call a no-op; model is the unwrapped model.
    """

    def __init__(self, cfg: Config, run_dir: Path, model: nn.Module, val_dataset: Dataset, device: torch.device,
                 active: bool = True):
        self.cfg, self.run_dir, self.model, self.val_dataset, self.device = cfg, run_dir, model, val_dataset, device
        self.active, self.curves, self.writer = active, True, None
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.curves = False
            if self.active:
                log.warning("curves.png is off: matplotlib is not installed (pip install matplotlib to enable it)")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: --tensorboard needs the tensorboard package, which is not "
                                  "installed: pip install tensorboard, or drop --tensorboard") from None
            if self.active:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        steps = run_dir / "steps.jsonl"
        self.steps_read = steps.stat().st_size if steps.exists() else 0  # on resume: logged before, skip

    def record_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Call after the epoch's metrics.csv row is written; epoch counts from 1."""
        if not self.active:
            return
        cfg, grid = self.cfg, None
        if cfg.vis_every and epoch % cfg.vis_every == 0:
            grid = draw_prediction_grid(self.model, self.val_dataset, class_names(cfg), cfg.vis_samples,
                                        self.device, f"epoch {epoch}")
            save_png(grid, self.run_dir / "vis" / f"epoch_{epoch}.png")
        if self.curves:
            draw_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        if self.writer is not None:
            self._write_tensorboard(epoch, row, grid)

    def _write_tensorboard(self, epoch: int, row: dict[str, Any], grid: torch.Tensor | None) -> None:
        with open(self.run_dir / "steps.jsonl") as handle:  # the step lines written since the last call
            handle.seek(self.steps_read)
            lines = handle.readlines()
            self.steps_read = handle.tell()
        for record in map(json.loads, lines):
            if record.get("event") == "log":
                for key in _STEP_SCALARS:
                    if key in record:
                        self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if grid is not None:
            self.writer.add_image("val/predictions", grid, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
