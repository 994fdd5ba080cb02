"""Train AdaptiveStream: per-pixel segmentation + image classification, with a NaN-guarded loop.

Commands (settings: config.py; every setting also takes a YAML key and a flag):

    python train_enhanced_adaptivestream.py                                  # CPU/GPU, synthetic data
    python train_enhanced_adaptivestream.py --device cuda --epochs 30        # one GPU
    torchrun --standalone --nproc_per_node=4 train_enhanced_adaptivestream.py --device cuda
    python train_enhanced_adaptivestream.py --config my.yaml --out-dir runs/a
    python train_enhanced_adaptivestream.py --out-dir runs/a --resume runs/a/last.pt
    python train_enhanced_adaptivestream.py --eval-only --checkpoint runs/a/best.pt
    python train_enhanced_adaptivestream.py --predict photos/ --checkpoint runs/a/best.pt --out preds/
    python train_enhanced_adaptivestream.py --export model.pt2 --checkpoint runs/a/best.pt  # or model.onnx
    python train_enhanced_adaptivestream.py --predict photos/ --checkpoint model.pt2 --out preds/

Exit codes: 0 finished; 1 training failed (diverged, too many skipped steps) or an exported file does not
reproduce its model; 2 bad usage or input (config, data, checkpoint), with a message naming the key or file.
"""

# ---- Imports and logging ----
from __future__ import annotations

import copy
import csv
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data.distributed
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from config import (BUILTIN_ENCODER_ONLY, CLS_POOL, CLS_WEIGHT, DECODER_CHANNELS, DICE_WEIGHT, IGNORE_INDEX,
                    INVOCATION_ONLY, LABEL_SMOOTHING, LOGIT_BOUND, SEG_WEIGHT, STEM_KERNEL, STREAM_CHANNELS, WIDTH,
                    Config, ConfigError, build_parser, defaults, effective_warmup_epochs, load_config, unused_settings,
                    validate)
from data import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, Baselines, DataError, build_datasets, build_loaders,
                  class_names, data_baselines, image_files, open_image, report_data, resolve_data_settings)
from results import METRIC_COLUMNS, ResultsRecorder, overlay_mask, save_png, seg_palette, write_metrics_row

log = logging.getLogger("adaptivestream")


class TrainingFailed(RuntimeError):
    """The run could not go on (diverged, too many skipped steps). main() exits with code 1."""


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(run_dir: Path | None, quiet: bool = False) -> list[logging.Handler]:
    """Console (+ train.log) handlers on the script's logger; returned so main() can remove them.

    quiet (ranks > 0 under torchrun): errors only, no file.
    """
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False
    handlers: list[logging.Handler] = [_TqdmHandler()]
    handlers[0].setFormatter(logging.Formatter("%(message)s" if not quiet else "[rank error] %(message)s"))
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    for handler in handlers:
        log.addHandler(handler)
    return handlers


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
    """Small ResNet-style encoder: a stride-2 conv stem, a max-pool to stride 4, then residual stages.

    The stem is a stem_kernel x stem_kernel conv (7 by default, ResNet's; 3 before STEM_KERNEL). Its output
    is also the decoder's only skip at stride 2, from which the full-resolution logits place each edge: with
    aux_weight 1 it raised val mIoU on every synthetic and digits seed, for 1.01x the step time
    (docs/results.md).

    Stage i (stride 2**(i+1)) has width * 2**i channels and BLOCKS[i] residual blocks after its entry
    (a stride-2 conv, or the max-pool and a 3x3 conv at stride 4). On real digits (benchmarks/README.md)
    this layout learned classification in fewer epochs than the earlier one (plain stride-2 convs, one
    block at strides 8-32): val accuracy 0.90 vs 0.79 at epoch 15 of 30, 0.96 vs 0.89 at the end.
    """

    BLOCKS = (0, 1, 2, 2, 2)  # residual blocks at strides 2, 4, 8, 16, 32

    def __init__(self, width: int, stem_kernel: int):
        super().__init__()
        self.channels = [width, width * 2, width * 4, width * 8, width * 16]
        stages, cin = [], 3
        for i, (cout, blocks) in enumerate(zip(self.channels, self.BLOCKS)):
            if i == 0:
                entry = [conv_bn_relu(cin, cout, stride=2, kernel=stem_kernel)]
            elif i == 1:
                entry = [nn.MaxPool2d(3, 2, 1), conv_bn_relu(cin, cout)]
            else:
                entry = [conv_bn_relu(cin, cout, stride=2)]
            stages.append(nn.Sequential(*entry, *(ResidualBlock(cout) for _ in range(blocks))))
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
    cls_pool avgmax pools each of those levels by its mean and its max: a mean over the whole image dilutes a
    small object with its background (the digits' accuracy rose by 0.03 with the max beside it).
    With aux_strides (deep supervision, AUX_WEIGHT > 0), forward(x, aux=True) also returns {stride: coarse
    seg logits [B, S, H/stride, W/stride]} of those decoder levels (of the padded input), for the training loss
    only: supervised directly, the coarse levels decide whole shapes sooner (docs/results.md).
    """

    def __init__(self, num_seg_classes: int, num_cls_classes: int, backbone: str = "adaptivestream",
                 pretrained: bool = False, width: int = WIDTH, stream_channels: int = STREAM_CHANNELS,
                 decoder_channels: int = DECODER_CHANNELS, aux_strides: Iterable[int] = (),
                 stem_kernel: int = STEM_KERNEL, cls_pool: str = CLS_POOL):
        super().__init__()
        if cls_pool not in ("avg", "avgmax"):
            raise ValueError(f"cls_pool must be avg or avgmax, got {cls_pool!r}")
        self.cls_pool = cls_pool
        if backbone == "adaptivestream":
            self.encoder: nn.Module = BuiltinEncoder(width, stem_kernel)
        else:
            self.encoder = TorchvisionEncoder(backbone, pretrained)
        enc = self.encoder.channels  # strides 2, 4, 8, 16, 32
        self.stream = conv_bn_relu(enc[4], stream_channels, kernel=1)
        # Output channels at strides 16, 8, 4, 2, 1. The last stage has no encoder feature to fuse (no 3x3
        # fuse conv at full resolution: that conv alone was half the step time). At half the width (8)
        # one default run never predicted its rarest class (val IoU 0.000 for 10 epochs), so it stays.
        dec = [decoder_channels * m for m in (8, 4, 2, 1, 1)]
        skips = [enc[3], enc[2], enc[1], enc[0], 0]
        cins = [stream_channels] + dec[:-1]
        self.decoder = nn.ModuleList(UpStage(ci, cs, co) for ci, cs, co in zip(cins, skips, dec))
        self.seg_head = nn.Conv2d(dec[-1], num_seg_classes, 1)
        level_channels = {32: stream_channels, 16: dec[0], 8: dec[1], 4: dec[2]}
        # Built coarse to fine whatever the order asked, so [8, 16] and [16, 8] are the same model.
        self.aux_heads = nn.ModuleDict({str(stride): nn.Conv2d(level_channels[stride], num_seg_classes, 1)
                                        for stride in sorted(set(aux_strides), reverse=True)})
        pooled = (stream_channels + dec[0] + dec[1] + dec[2]) * (2 if cls_pool == "avgmax" else 1)
        self.cls_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(pooled, num_cls_classes))
        self._init_weights(pretrained_encoder=pretrained and backbone != "adaptivestream")

    def _init_weights(self, pretrained_encoder: bool) -> None:
        for name, module in self.named_modules():
            if pretrained_encoder and name.startswith("encoder"):
                continue
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):  # residual branches too: started at 0.1, the digits'
                nn.init.ones_(module.weight)  # val accuracy fell by 0.12 over four seeds (benchmarks/README.md)
                nn.init.zeros_(module.bias)
        # Small last layers, so each head's initial loss is close to ln(C). The cls head's inputs (pooled
        # ReLU features, all >= 0) move every logit of an image together: at 0.5 the initial cls loss of
        # 4-image batches was up to 27% above ln(C) over 12 seeds, at 0.25 within 13%. Much smaller (1e-3)
        # measured slower: Adam grows a weight by ~lr per step, and the seg head took >1000 steps to beat
        # the class prior.
        for head, scale in self.small_init_heads():
            nn.init.normal_(head.weight, std=scale * head.weight[0].numel() ** -0.5)
            nn.init.zeros_(head.bias)

    def small_init_heads(self) -> list[tuple[nn.Module, float]]:
        """The last layers initialised small on purpose, with their scale (std = scale / sqrt(fan-in)). Adam's
        first steps move each of their elements by about lr: relative to the weight, 4 lr sqrt(fan-in) for the
        cls head (0.106 at lr 1e-3 with avgmax's 704 inputs), which diagnose's update.ratio must not read as a
        learning rate that is too high."""
        return ([(self.seg_head, 0.5)] + [(head, 0.5) for head in self.aux_heads.values()]
                + [(self.cls_head[-1], 0.25)])

    def pool(self, y: torch.Tensor) -> list[torch.Tensor]:
        """A level's features over the (padded) image for the cls head: [mean] or [mean, max], each [B, C]."""
        return [y.mean(dim=(2, 3))] + ([y.amax(dim=(2, 3))] if self.cls_pool == "avgmax" else [])

    def forward(self, x: torch.Tensor, aux: bool = False) -> tuple[torch.Tensor, ...]:
        height, width = x.shape[-2:]
        # Pad right and bottom with zeros (the mean colour after normalisation) to 32 * ceil(size / 32), also
        # when that pad is 0 (then it is a copy): with no branch on the size and the padded size written as
        # 32 * q, torch.export traces one graph that holds for every H and W (--export).
        x = F.pad(x, (0, 32 * ((width + 31) // 32) - width, 0, 32 * ((height + 31) // 32) - height))
        feats = self.encoder(x)  # strides 2, 4, 8, 16, 32
        y = self.stream(feats[4])  # [B, stream, H/32, W/32]
        pooled, levels = self.pool(y), {32: y}
        for i, (stage, skip) in enumerate(zip(self.decoder, [feats[3], feats[2], feats[1], feats[0], None])):
            y = stage(y, skip)
            levels[16 >> i] = y  # strides 16, 8, 4, 2, 1
            if i < 3:
                pooled += self.pool(y)
        seg = self.seg_head(y)[..., :height, :width]  # [B, S, H, W]
        cls = self.cls_head(torch.cat(pooled, dim=1))  # [B, C]
        if aux:
            if not self.aux_heads:
                raise ValueError("aux=True: this model was built without aux heads (aux_weight 0)")
            return seg, cls, {int(stride): head(levels[int(stride)]) for stride, head in self.aux_heads.items()}
        return seg, cls


def build_model(cfg: Config, from_checkpoint: bool = False) -> AdaptiveStream:
    """The model of cfg; from_checkpoint: its weights are about to be loaded, so no pretrained ones are fetched
    (a checkpoint trained with --pretrained resumes, evaluates and predicts offline)."""
    return AdaptiveStream(cfg.num_seg_classes, cfg.num_cls_classes, backbone=cfg.backbone,
                          pretrained=cfg.pretrained and not from_checkpoint, width=cfg.width,
                          stream_channels=cfg.stream_channels, decoder_channels=cfg.decoder_channels,
                          stem_kernel=cfg.stem_kernel, cls_pool=cfg.cls_pool,
                          aux_strides=cfg.aux_strides if cfg.aux_weight > 0 else ())


class WeightEMA:
    """Exponential moving average of a model's weights, the model that is evaluated and saved for inference.

    After each accepted step: ema += w * (param - ema), w = 1 - min(EMA_DECAY, (1 + n) / (10 + n)) for the
    n-th accepted update (the warm-up of timm's ModelEmaV3, so a short run is not dominated by its random
    init). On a skipped step w is 0, decided on the device: swa_utils.AveragedModel reads its update count
    on the host (a sync per step on CUDA) and has no way to skip an update. BatchNorm buffers are the
    model's own: copied when they are read (eval_model, state_dict), not on every step; with own_buffers
    (BN_RECALIBRATE: re-estimated for the averaged weights before each evaluation) they are copied only until
    the first re-estimate, so that a checkpoint holds the statistics its evaluation used.
    """

    def __init__(self, model: nn.Module, decay: float, own_buffers: bool = False):
        self.source, self.decay, self.own_buffers = model, decay, own_buffers
        self.recalibrated = False  # own_buffers: set once recalibrate_bn has estimated them
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = [p.detach() for p in model.parameters()]
        self.averaged = list(self.module.parameters())
        self.updates = torch.zeros((), device=self.params[0].device)

    @torch.no_grad()
    def update(self, skip: torch.Tensor) -> None:
        accepted = (~skip).float()
        weight = (1 - torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)) * accepted
        torch._foreach_lerp_(self.averaged, self.params, [weight] * len(self.averaged))
        self.updates += accepted

    @torch.no_grad()
    def synced(self) -> nn.Module:
        """The averaged model with the source model's current BatchNorm statistics (its own with own_buffers)."""
        if not (self.own_buffers and self.recalibrated):
            for mine, theirs in zip(self.module.buffers(), self.source.buffers()):
                mine.copy_(theirs)
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.synced().state_dict(), "updates": self.updates.clone(),
                "recalibrated": self.recalibrated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates.copy_(state["updates"])
        self.recalibrated = bool(state.get("recalibrated", False))


def inference_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's evaluations were made with: the EMA's when the run kept one."""
    return payload["ema"]["model"] if payload.get("ema") else payload["model"]


# ---- Loss ----
def one_hot(target: torch.Tensor, valid: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S, H, W] class indicators of target [B, H, W], all 0 on pixels not valid (ignored). Comparisons, no
    scatter: deterministic on CUDA too."""
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    return (target.where(valid, -1).unsqueeze(1) == classes).to(dtype)


def dice_sums(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[3, S]: per class the soft intersection |P.T|, |P| + |T| and |T|, over the scored pixels; P the class's
    softmax, T its target pixels. Sums, so batches and processes add up (evaluate() scores the whole split).
    Comparisons and sums only (no scatter), so it is deterministic on CUDA too."""
    truth = one_hot(target, valid, probs.shape[1], probs.dtype)
    probs = probs * valid.unsqueeze(1)
    counts = truth.sum((0, 2, 3))
    return torch.stack([(probs * truth).sum((0, 2, 3)), probs.sum((0, 2, 3)) + counts, counts])


def dice_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The soft Dice loss: the mean over the classes present (|T| > 0) of 1 - 2|P.T| / (|P| + |T|); 0 when no
    class is present. Every class counts the same however few its pixels: a shape missed whole costs as much
    as a missed large class, where cross-entropy weighs it by its pixels. A class absent from the target is
    left out: its Dice is undefined, and cross-entropy already penalises painting it."""
    present = sums[2] > 0
    dice = 1 - 2 * sums[0] / sums[1].clamp_min(1e-12)
    return (dice * present).sum() / present.sum().clamp_min(1)


class StableLoss(nn.Module):
    """SEG_WEIGHT x (segmentation CE + DICE_WEIGHT x soft Dice) + CLS_WEIGHT x classification CE, in float32
    even under autocast.

    Logits go through the smooth bound c*x/(c+|x|): bounded by c, and unlike c*tanh(x/c), whose
    float32 gradient is exactly 0 once |x| > ~9c, its gradient never vanishes. A non-finite loss is
    returned as it is: the training loop's guard skips that step and counts it. Class weights and label
    smoothing apply to the cross-entropies; the Dice term weighs every class the same by construction.
    aux() is the deep-supervision term the training step adds to what it optimises; forward() and the
    reported losses leave it out, so train and val losses stay comparable. The defaults are config.py's,
    but aux_weight's: 0, no deep supervision unless asked.
    """

    def __init__(self, seg_weight: float = SEG_WEIGHT, cls_weight: float = CLS_WEIGHT, ignore_index: int = IGNORE_INDEX,
                 seg_class_weights: Iterable[float] | None = None, cls_class_weights: Iterable[float] | None = None,
                 logit_bound: float = LOGIT_BOUND, label_smoothing: float = LABEL_SMOOTHING,
                 dice_weight: float = DICE_WEIGHT, aux_weight: float = 0.0):
        super().__init__()
        self.seg_weight, self.cls_weight, self.dice_weight = seg_weight, cls_weight, dice_weight
        self.aux_weight = aux_weight
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
        seg_logits = self.bound(seg_logits.float())
        seg_loss, valid = self.seg_ce(seg_logits, seg_target)
        parts = {"seg_ce": seg_loss.detach()}
        sums = None
        if self.dice_weight:
            sums = dice_sums(seg_logits.softmax(1), seg_target, valid)
            parts["dice_sums"] = sums.detach()
        cls_loss = F.cross_entropy(self.bound(cls_logits.float()), cls_target.long(), weight=self.cls_class_weights,
                                   label_smoothing=self.label_smoothing)
        total, seg_loss = self.combine(seg_loss, sums, cls_loss)
        return total, {"seg": seg_loss.detach(), "cls": cls_loss.detach(), **parts}

    def seg_ce(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted mean cross-entropy over scored pixels, the scored-pixel mask) of bounded logits."""
        per_pixel = F.cross_entropy(logits, target, weight=self.seg_class_weights, ignore_index=self.ignore_index,
                                    reduction="none", label_smoothing=self.label_smoothing)
        valid = target != self.ignore_index
        if self.seg_class_weights is None:
            weight_sum = valid.sum()
        else:
            weight_sum = (self.seg_class_weights[target.where(valid, 0)] * valid).sum()
        # Mean over scored pixels; a batch with no scored pixel contributes 0, not 0/0 = NaN.
        return per_pixel.sum() / weight_sum.clamp_min(1e-12), valid

    def aux(self, aux_logits: dict[int, torch.Tensor], seg_target: torch.Tensor) -> torch.Tensor:
        """Deep supervision: the sum over {stride: coarse logits [B, S, h, w]} of SEG_WEIGHT x AUX_WEIGHT x the
        cross-entropy of each logit held for the stride x stride target pixels it covers (the target padded with
        ignore_index to h x stride by w x stride, the same padded size at every stride), bounded, in float32: the
        full-resolution cross-entropy of nearest-upsampled logits (same class weights, label smoothing and
        ignore_index), computed from each cell's class counts, at 1/stride**2 of the work of upsampling (at
        224 px that cost 79 of a step's ~540 ms on one thread). The counts are taken once, at the finest
        stride, and summed 2x2 for each coarser one (the one-hot target per stride cost 2-3 ms a head)."""
        finest = min(aux_logits)
        b, s, h, w = aux_logits[finest].shape
        target = seg_target.long()
        target = F.pad(target, (0, w * finest - target.shape[-1], 0, h * finest - target.shape[-2]),
                       value=self.ignore_index)
        truth = one_hot(target, target != self.ignore_index, s, torch.float32)
        counts = truth.view(b, s, h, finest, w, finest).sum((3, 5))  # [B, S, h, w] target pixels per cell
        weights = (torch.ones(s, device=target.device) if self.seg_class_weights is None
                   else self.seg_class_weights).view(1, -1, 1, 1)
        scored = (counts * weights).sum().clamp_min(1e-12)  # the same pixels at every stride
        eps = self.label_smoothing  # per pixel: (1 - eps) w_y nll_y + eps / S sum_k w_k nll_k, as F.cross_entropy
        total = counts.new_zeros(())
        for stride in sorted(aux_logits):
            f = stride // finest
            cells = counts.view(b, s, h // f, f, w // f, f).sum((3, 5)) if f > 1 else counts
            nll = -F.log_softmax(self.bound(aux_logits[stride].float()), dim=1) * weights  # per class, weighted
            total = total + (1 - eps) * (cells * nll).sum() + eps / s * (cells.sum(1, keepdim=True) * nll).sum()
        return self.seg_weight * self.aux_weight * total / scored  # each term a mean over scored pixels, as seg_ce

    def combine(self, seg_ce: torch.Tensor, sums: torch.Tensor | None,
                cls_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, seg) from the segmentation cross-entropy, the Dice term's dice_sums (None: no Dice term)
        and the classification loss: the one place the parts are weighed, for a batch or a whole split."""
        seg = seg_ce if sums is None else seg_ce + self.dice_weight * dice_from_sums(sums)
        return self.seg_weight * seg + self.cls_weight * cls_loss, seg


def build_loss(cfg: Config) -> StableLoss:
    return StableLoss(cfg.seg_weight, cfg.cls_weight, cfg.ignore_index, cfg.seg_class_weights,
                      cfg.cls_class_weights, cfg.logit_bound, cfg.label_smoothing, cfg.dice_weight, cfg.aux_weight)


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

    # What a checkpoint or a snapshot gives back: how far the schedule has come. Its shape (base LRs, warm-up,
    # floor, decay) is built from the run's settings, so that one given again on resume applies.
    PROGRESS = ("last_epoch", "_step_count", "lr_scale")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k in self.PROGRESS})

    def refresh(self) -> None:
        """Apply the LR of the current step again, after last_epoch or lr_scale was changed by hand."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def peak_lr(cfg: Config) -> float:
    """base_lr, times the number of processes under torchrun with scale_lr (the linear scaling rule, Goyal et
    al., 2017). cfg.base_lr itself stays as given, so that a run's config.yaml repeats the run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return cfg.base_lr * world_size if cfg.scale_lr else cfg.base_lr


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Fused optimizers: they take the guard's found_inf flag and skip on the device (no host sync)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.dim() <= 1 else decay).append(param)  # no decay on BN and biases
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=peak_lr(cfg), momentum=cfg.momentum, fused=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=peak_lr(cfg), fused=True)
    zero_missing_momentum(optimizer)
    return optimizer


def zero_missing_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every SGD parameter a zero momentum buffer if it has none yet.

    Fused SGD makes missing buffers with torch.empty_like on its first step, and its kernel returns
    early when found_inf is 1: a skipped first step would leave them as uninitialised memory that the
    next step multiplies by the momentum. With zeros the first step is buf = 0 * m + g = g exactly, as
    on a clean first step (dampening 0). Called after building and after loading a state dict (a
    checkpoint from before the first step holds none). AdamW makes its state with zeros: nothing to do.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Put each optimizer state tensor of a parameter's shape (AdamW's moments, SGD's momentum) in that
    parameter's memory layout. load_state_dict keeps the strides a checkpoint was saved with, and a run resumed
    under another channels_last setting (resolved again on each machine) gets channels-last moments for
    contiguous weights, or the reverse: CUDA's fused kernels then refuse to step, and the CPU's step silently
    pairs each weight with another element's moments (measured: 0.15 off after one AdamW step)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 arithmetic in hardware


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU_BF16_FLAGS this machine's /proc/cpuinfo lists (empty where there is no such file: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


# The settings whose `auto` depends on the machine. A checkpoint holds what they became where it was written and
# which of them were auto: those are resolved again where it is resumed or evaluated; an explicit choice travels.
MACHINE_SETTINGS = ("amp", "channels_last", "compile")


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """(off | bf16 | fp16, why) for an AMP setting; auto -> bf16 where the hardware computes in bf16, else off.

    auto never picks fp16: it needs loss scaling and overflows above 65504, a choice to make on purpose.
    """
    if amp != "auto":
        return amp, "set explicitly"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # Pre-Ampere GPUs (V100, T4) emulate bf16, which is_bf16_supported() counts unless told not to.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{name} computes bf16 natively (torch.cuda.is_bf16_supported)"
        return "off", (f"{name} has no native bf16; fp16 is never chosen automatically (pass --amp fp16 to use "
                       f"it)")
    flags = cpu_bf16_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if flags:
        return "bf16", f"CPU has native bf16: {', '.join(flags)} in /proc/cpuinfo; torch CPU capability {capability}"
    # Without these units autocast still runs bf16 kernels, emulated: no faster than float32 and less precise.
    return "off", (f"CPU without native bf16 (no {' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo; torch CPU "
                   f"capability {capability})")


def resolve_channels_last(amp: str, device: torch.device) -> tuple[str, str]:
    """(on | off, why) for CHANNELS_LAST auto, given the resolved AMP setting.

    On for CPUs (oneDNN's convolutions are NHWC-native: 1.39x the training images/s of the default
    model at 224 px in float32 on an AVX-512 Xeon, benchmarks/README.md) and for CUDA with bf16/fp16,
    whose tensor-core convolutions read and write NHWC. Off for CUDA in float32, where cuDNN's NCHW
    kernels are the usual fast path.
    """
    if device.type == "cuda":
        if amp in ("bf16", "fp16"):
            return "on", f"CUDA with {amp}: tensor-core convolutions are NHWC-native"
        return "off", "CUDA in float32: NCHW is cuDNN's usual fast path"
    return "on", "CPU: oneDNN convolutions are NHWC-native (measured faster, benchmarks/README.md)"


COMPILE_MIN_STEPS = 1000  # COMPILE auto: shorter runs would spend a large part of their time compiling


def resolve_compile(device: torch.device, steps: int) -> tuple[str, str]:
    """(on | off, why) for COMPILE auto, given the run's planned optimizer steps.

    torch.compile costs about a minute (CPU: 40-150 s for the default model, once per mode: training,
    evaluation) and then trains 1.47x the images/s of eager on CPU (benchmarks/README.md). It pays
    over runs of COMPILE_MIN_STEPS steps or more, and needs inductor's code generator: a C++
    compiler on CPU, triton on CUDA. `on` compiles whatever the length; a failed compilation then
    stops the run, where auto goes on eager with a WARN line.
    """
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:  # inductor's GPU code generator
            return "off", "triton is not installed (inductor needs it on CUDA)"
    else:
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            return "off", f"no C++ compiler ({', '.join(compilers)}) on PATH: inductor needs one on CPU"
    if steps < COMPILE_MIN_STEPS:
        return "off", (f"{steps} steps: too few to pay back about a minute of compilation (auto compiles runs of "
                       f"{COMPILE_MIN_STEPS} steps or more; --compile on forces it)")
    return "on", f"{steps} steps: about a minute of compilation pays back over the run (--compile off skips it)"


def autocast(amp: str, device: torch.device):
    """The forward pass's precision context for an AMP setting (off | bf16 | fp16); the loss stays float32."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp {amp!r} is not resolved: call resolve_amp first (build_run does)")
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def build_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupLRScheduler:
    return WarmupLRScheduler(optimizer, warmup_steps=round(effective_warmup_epochs(cfg) * steps_per_epoch),
                             total_steps=cfg.epochs * steps_per_epoch, min_lr=cfg.min_lr, decay=cfg.lr_decay,
                             gamma=cfg.lr_gamma, steps_per_epoch=steps_per_epoch)


# ---- Guard ----
SKIP_REASONS = {1: "non-finite loss", 2: "non-finite gradient", 3: "gradient explosion",
                4: "gradient spike", 5: "loss spike"}


def lower_nanmedian(rows: torch.Tensor) -> torch.Tensor:
    """Each row's median of its non-NaN values, the lower middle one for an even count (NaN for a row of NaNs):
    torch.nanmedian(dim=1).values, without the indices output that CUDA's deterministic mode refuses to compute
    (--deterministic stopped the first step with a spike check on). sort puts NaN last; no host sync."""
    count = (~rows.isnan()).sum(dim=1, keepdim=True)
    return rows.sort(dim=1).values.gather(1, (count - 1).clamp_min(0) // 2).squeeze(1)


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
        # One flat stash per (dtype, device): stash and restore are a few kernels per group instead of
        # two per buffer (~190 small launches for 63 float32/int64 buffers). The views alias the buffers.
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buf in self.buffers:
            groups.setdefault((buf.dtype, buf.device), []).append(buf.view(-1))
        self.groups = [(views, [v.numel() for v in views], torch.empty(sum(v.numel() for v in views),
                        dtype=views[0].dtype, device=views[0].device)) for views in groups.values()]
        self.skip_grad_norm = cfg.skip_grad_norm
        self.grad_spike, self.loss_spike = cfg.grad_spike_factor, cfg.loss_spike_factor
        self.spike_warmup = cfg.spike_warmup
        window = cfg.spike_window
        self.history = torch.full((2, window), float("nan"), device=device)  # [grad norm, loss] of accepted steps
        self.accepted = torch.zeros((), dtype=torch.long, device=device)

    def stash_buffers(self) -> None:
        for views, _, stash in self.groups:
            torch.cat(views, out=stash)

    def reason(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        reason = torch.zeros((), dtype=torch.long, device=loss.device)
        if self.grad_spike > 0 or self.loss_spike > 0:
            median = lower_nanmedian(self.history)  # [2]
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
        for views, sizes, stash in self.groups:  # where on the device, not a branch: no host sync
            torch._foreach_copy_(views, torch.where(skip, stash, torch.cat(views)).split(sizes))
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
        else:
            log.info("spike_window changed (%d saved, %d now): the spike medians start again",
                     state["history"].shape[1], self.history.shape[1])
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
    model = unwrap(model)
    payload = {"format": BAD_BATCH_FORMAT, "images": batch["image"].detach().float().cpu(),
               "masks": torch.as_tensor(batch["mask"]).long().cpu(), "labels": torch.as_tensor(batch["label"]).long().cpu(),
               "ids": [str(i) for i in batch["id"]], "step": step, "epoch": epoch, "reason": reason,
               "loss": loss, "grad_norm": grad_norm, "lr": lr, "amp": amp, "weights_step": weights_step,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": cfg.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        torch.save(payload, tmp)
        os.replace(tmp, path)


def load_bad_batch(path: str | Path) -> dict[str, Any]:
    """Read a file written by save_bad_batch; raise DataError naming the file if it is not one."""
    return read_tagged(path, BAD_BATCH_FORMAT, "bad-batch file", DataError)


def _cpu_copy(tree: Any) -> Any:
    """A deep copy with every tensor on the CPU (snapshots must not alias live tensors)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


def training_state(run: Run) -> dict[str, Any]:
    """What a rollback or a resume restores: weights and BN buffers, optimizer, schedule, guard, scaler, RNG.

    Under torchrun every rank must call it (the RNG streams of all ranks are gathered)."""
    return {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "guard": run.guard.state_dict() if run.guard else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "rng": rng_state(run.device, run.world_size)}


def restore_training_state(run: Run, saved: dict[str, Any]) -> None:
    saved = _cpu_copy(saved)  # load_state_dict may keep references; the saved copy must stay intact
    unwrap(run.model).load_state_dict(saved["model"])
    # The state (moments, step counts) is the checkpoint's; the hyperparameters (weight decay, momentum, betas)
    # are the run's settings, so that one given again on resume applies (load_state_dict would restore the saved).
    settings = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(saved["optimizer"])
    for group, own in zip(run.optimizer.param_groups, settings):
        group.update(own)
    match_parameter_layout(run.optimizer)
    zero_missing_momentum(run.optimizer)
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scheduler.refresh()
    if run.guard is not None and saved.get("guard"):
        run.guard.load_state_dict(saved["guard"])
    if run.scaler is not None and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    if run.ema is not None:  # a checkpoint without one (EMA switched on at resume) starts it from the weights
        run.ema.load_state_dict(saved["ema"] if saved.get("ema") else {"model": saved["model"],
                                                                        "updates": torch.zeros(())})
    set_rng_state(saved["rng"], run.device, run.rank, run.cfg.seed)


def take_snapshot(run: Run) -> dict[str, Any]:
    """The last good training state, copied to CPU memory (cost: see benchmarks/bench_train.py)."""
    return _cpu_copy(training_state(run))


def replay_hint(run: Run) -> str:
    """Where the saved skipped batches are and how to replay one: the next step of both aborts."""
    bad = run.run_dir / "bad_batches"
    first = f"step_{min(int(p.stem[5:]) for p in bad.glob('step_*.pt'))}" if any(bad.glob("step_*.pt")) else None
    if first is None:
        return f"No skipped batch was saved (bad_batch_limit={run.cfg.bad_batch_limit}): run diagnose_training.py " \
               f"--run {run.run_dir}"
    return (f"The first {run.state.bad_batches_saved} skipped batches are in {bad}: replay one with `python "
            f"diagnose_training.py --batch {bad}/{first}.pt`, or run `python diagnose_training.py --run {run.run_dir}`")


def roll_back(run: Run, why: str) -> dict[str, Any]:
    """Restore the last snapshot and back the LR off; abort after MAX_ROLLBACKS. Returns the event record.

    The data cursor is not rewound: the run moves on past the batches that caused the trouble.
    """
    cfg, state = run.cfg, run.state
    if state.rollbacks >= cfg.max_rollbacks:
        raise TrainingFailed(
            f"{why} at step {state.step}, after {state.rollbacks} rollbacks already (max_rollbacks="
            f"{cfg.max_rollbacks}); skipped steps so far: {state.skipped}. {replay_hint(run)}")
    restore_training_state(run, run.snapshot)
    state.rollbacks += 1
    state.lr_scale *= cfg.lr_backoff
    state.consecutive_skips = state.accepted_since_snapshot = 0
    run.scheduler.lr_scale = state.lr_scale
    run.scheduler.refresh()
    log.warning("rollback %d/%d at step %d: %s; restored the last good snapshot and scaled the LR by %g "
                "(now x%g, lr %.3g); moving on past these batches", state.rollbacks, cfg.max_rollbacks,
                state.step, why, cfg.lr_backoff, state.lr_scale, run.scheduler.get_last_lr()[0])
    return {"event": "rollback", "step": state.step, "reason": why, "rollbacks": state.rollbacks,
            "lr_scale": state.lr_scale, "lr": run.scheduler.get_last_lr()[0]}


# ---- Metrics ----
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """[K, K] counts, rows = target, columns = prediction; ignored targets are dropped. Stays on the device.

    No host sync: ignored and out-of-range pixels go to an extra last bin instead of being dropped by
    boolean indexing (nonzero), and scatter_add_ fills a fixed-size count (bincount reads the max of its
    input back to size its output; scatter_add_ is deterministic on a 1-D CUDA tensor).
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)  # the ignore index is out of range (config checks it)
    if ignore_index is not None:
        keep &= target != ignore_index
    index = torch.where(keep, target * num_classes + pred, num_classes**2)
    counts = torch.zeros(num_classes**2 + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].reshape(num_classes, num_classes)


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


# A head learned when its best val metric clears the baseline of its data by this share of the headroom
# (1 - baseline): 0.05 puts the bar at mIoU 0.25 on the default synthetic data (baseline 0.21, the majority
# class everywhere). Runs measured against it: a 10x-too-high LR ended at 0.211 (did not learn); quick_test
# and the default run clear it by a wide margin. Accuracy also has to clear two standard errors of the
# baseline on the val set: on 8 val images one image is 0.125 of accuracy, and the best of several epochs
# picks the luckiest.
LEARNED_MARGIN = 0.05
MEMORISING_TRAIN_SHARE = 0.5  # memorising: train cls acc clears the baseline by this share of the headroom...
MEMORISING_LOSS_RATIO = 2.0  # ...or (seg, which has no train metric) val loss above this x train loss
STILL_FALLING = 0.02  # the last epoch's train loss below the one before by this fraction: still learning
LOSS_ROSE = 1.1  # a train loss above this x the uniform guess rose: the LR (a head without gradient stays at 1x)
# head -> (val metric column, its name, train-metric column or None)
HEAD_METRICS = {"seg": ("val_miou", "mIoU", None), "cls": ("val_cls_acc", "cls acc", "train_cls_acc")}


@dataclass
class HeadVerdict:
    """Whether one head learned, against the baselines of its data; `kind` names the likely cause."""

    head: str
    verdict: str  # learned | did not learn | memorising | not trained
    metric: str
    best: float  # best val metric over the epochs
    baseline: float
    kind: str = ""  # lr | memorising | too_few_steps | no_signal (why it did not learn)
    cause: str = ""  # one line for a person

    def line(self) -> str:
        text = f"{self.head} {self.verdict}: best val {self.metric} {self.best:.4f} vs baseline {self.baseline:.4f}"
        return text + (f"; {self.cause}" if self.cause else "")


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def judge_head(head: str, rows: list[dict[str, float]], baselines: Baselines, cfg: Config) -> HeadVerdict:
    """Verdict of one head from the epoch rows (metrics.csv's columns, as floats)."""
    metric, name, train_metric = HEAD_METRICS[head]
    baseline = baselines.seg_majority_miou if head == "seg" else baselines.cls_baseline()
    best = max(_finite(r[metric] for r in rows), default=math.nan)
    if getattr(cfg, f"{head}_weight") == 0:
        return HeadVerdict(head, "not trained", name, best, baseline, cause=f"{head}_weight is 0")
    uniform = getattr(baselines, f"{head}_uniform_loss")
    warm = [r for r in rows if r["epoch"] > effective_warmup_epochs(cfg)] or rows[-1:]
    losses = _finite(r[f"train_{head}_loss"] for r in warm)
    below_uniform = bool(losses) and min(losses) < uniform
    noise = 0.0 if head == "seg" else 2 * math.sqrt(baseline * (1 - baseline) / max(baselines.val_images, 1))
    if best >= baseline + max(LEARNED_MARGIN * (1 - baseline), noise) and below_uniform:
        return HeadVerdict(head, "learned", name, best, baseline)
    last = rows[-1]
    train = last[train_metric] if train_metric else math.nan
    if (train_metric and train >= baseline + MEMORISING_TRAIN_SHARE * (1 - baseline)) or (
            not train_metric and last[f"val_{head}_loss"] > MEMORISING_LOSS_RATIO * last[f"train_{head}_loss"]):
        seen = f"train {name} {train:.4f}" if train_metric else (
            f"train loss {last[f'train_{head}_loss']:.4f}, val loss {last[f'val_{head}_loss']:.4f}")
        return HeadVerdict(head, "memorising", name, best, baseline, "memorising",
                           f"memorising: {seen}, val near the baseline: more data or augmentation, or regularise")
    loss = last[f"train_{head}_loss"]
    previous = rows[-2][f"train_{head}_loss"] if len(rows) > 1 else math.nan
    if not math.isfinite(loss) or loss > LOSS_ROSE * uniform:
        kind, cause = "lr", (f"the train loss rose above a uniform guess ({loss:.4g} > {uniform:.4f}): the learning "
                             f"rate is too high (base_lr {cfg.base_lr:g}); lower --base-lr")
    elif loss < previous * (1 - STILL_FALLING):
        kind, cause = "too_few_steps", (f"too few steps: the train loss was still falling ({previous:.4f} -> "
                                        f"{loss:.4f}); train longer (--epochs)")
    else:
        kind, cause = "no_signal", (f"the train loss stayed at {loss:.4f} (uniform guess {uniform:.4f}): check that "
                                    f"masks and labels match the images")
    return HeadVerdict(head, "did not learn", name, best, baseline, kind, cause)


def judge_learning(rows: list[dict[str, float]], baselines: Baselines, cfg: Config) -> dict[str, HeadVerdict]:
    """Per-head verdicts of a run from its epoch rows; {} when no epoch finished."""
    return {head: judge_head(head, rows, baselines, cfg) for head in HEAD_METRICS} if rows else {}


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


@contextmanager
def signals_deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold SIGINT/SIGTERM for the duration of a file write, then deliver them in order.

    A second Ctrl-C raises KeyboardInterrupt at once; inside torch.save it would leave only the .tmp file
    and chained tracebacks. The write takes well under a second, so waiting for it costs the user nothing.
    Handlers can only change in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for signum in received:
            signal.raise_signal(signum)


def save_checkpoint(path: Path, payload: dict[str, Any], write: bool = True) -> bool:
    """Write atomically: temp file, fsync, os.replace, fsync of the folder. A crash at any point leaves
    the previous file intact. Refuse (log, return False) if a tensor is non-finite or the write fails
    (disk full): the previous checkpoint is kept either way. write=False (ranks > 0) writes nothing."""
    if not write:
        return True
    bad = nonfinite_tensors({"model": payload["model"], "optimizer": payload.get("optimizer", {}),
                             "ema": payload.get("ema") or {}})
    if bad:
        log.error("not writing %s: non-finite tensors %s; the previous file is kept", path, ", ".join(bad[:5]))
        return False
    tmp = path.with_name(path.name + ".tmp")
    try:
        with signals_deferred():
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.error("could not write %s (%s); the previous file is kept", path, err)
        return False
    return True


def read_tagged(path: str | Path, tag: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """The dict a file of this script holds (checkpoint, bad batch), checked for its format tag.

    Raises `error` naming the file when it is missing, unreadable or not that kind of file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file: all mean "not a usable file"
        raise error(f"{what} {path} cannot be read ({type(err).__name__}: {err}); it may be truncated or not "
                    f"a {what} of this script") from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise error(f"{path} is not a {what} of this script (no {tag!r} tag)")
    return payload


def load_checkpoint(path: str | Path, cfg: Config | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint; raise CheckpointError naming the file and what is wrong."""
    payload = read_tagged(path, CHECKPOINT_FORMAT, "checkpoint", CheckpointError)
    upgrade_checkpoint(payload)
    bad = nonfinite_tensors({"model": payload["model"], "ema": payload.get("ema") or {}})
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite weights: {', '.join(bad[:5])}")
    if cfg is not None:
        check_fits(path, payload, cfg)
    check_model_layout(path, payload)
    return payload


def check_fits(path: str | Path, payload: dict[str, Any], cfg: Config) -> None:
    """Raise CheckpointError naming the setting when the checkpoint's weights do not fit the model of cfg."""
    saved = payload["config"]
    architecture = ["num_seg_classes", "num_cls_classes", "backbone", "stream_channels", "decoder_channels",
                    "cls_pool"]
    if saved.get("backbone") == "adaptivestream":  # a torchvision encoder ignores these (unused_settings)
        architecture += BUILTIN_ENCODER_ONLY
    for key in architecture:
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(f"checkpoint {path} was trained with {key}={saved.get(key)!r}, "
                                  f"but the current config has {key}={getattr(cfg, key)!r}")
    if (saved.get("aux_weight", 0) > 0) != (cfg.aux_weight > 0):  # the aux head exists iff aux_weight > 0
        raise CheckpointError(f"checkpoint {path} was trained with aux_weight={saved.get('aux_weight', 0)!r}, but the "
                              f"current config has aux_weight={cfg.aux_weight!r}: one has the aux head, the other "
                              f"not; leave --aux-weight out (the checkpoint's setting applies) or give its value")
    if cfg.aux_weight > 0 and sorted(saved["aux_strides"]) != sorted(cfg.aux_strides):
        raise CheckpointError(f"checkpoint {path} was trained with aux_strides={saved['aux_strides']!r}, but the "
                              f"current config has aux_strides={cfg.aux_strides!r}: its aux heads sit on other "
                              f"decoder levels; leave --aux-strides out (the checkpoint's setting applies)")


def upgrade_checkpoint(payload: dict[str, Any]) -> None:
    """A checkpoint of an earlier layout in today's terms, in place. Before STEM_KERNEL the stem was 3x3: its
    config gets stem_kernel 3 (whatever the default); before CLS_POOL, cls_pool avg. Before AUX_STRIDES
    (commit 56fd460 and earlier: one aux head, at stride 8, named aux_head): its weights under aux_heads.8, its
    config with aux_strides [8]. And --scale-lr's base_lr (below)."""
    payload["config"].setdefault("stem_kernel", 3)
    payload["config"].setdefault("cls_pool", "avg")  # before CLS_POOL the cls head read the means only
    # Before commit d9ba77a, --scale-lr under torchrun wrote base_lr x the processes into the config (its record of
    # auto_settings came after): back to base_lr as given, which peak_lr scales.
    saved_by = len(payload.get("rng", {}).get("ranks", [None]))
    if "auto_settings" not in payload and payload["config"].get("scale_lr") and saved_by > 1:
        payload["config"]["base_lr"] /= saved_by
    if "aux_strides" in payload["config"]:
        return
    payload["config"]["aux_strides"] = [8]
    for weights in (payload["model"], (payload.get("ema") or {}).get("model", {})):
        for key in [k for k in weights if k.startswith("aux_head.")]:
            weights["aux_heads.8." + key.removeprefix("aux_head.")] = weights.pop(key)


def check_model_layout(path: str | Path, payload: dict[str, Any]) -> None:
    """Raise CheckpointError when the checkpoint's weights do not fit the model this code builds from its
    settings (a checkpoint of an earlier version of the model), naming the first differences."""
    settings = {**defaults(), **payload["config"], "pretrained": False}  # keys added since: their defaults
    expected = {k: tuple(v.shape) for k, v in build_model(Config(**settings)).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in payload["model"].items()}
    if expected == found:
        return
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                        for what, keys in (("missing", missing), ("unexpected", unexpected),
                                           ("other shape", shapes)) if keys)
    raise CheckpointError(f"checkpoint {path} holds weights of another model layout than this version of "
                          f"train_enhanced_adaptivestream.py builds from its settings ({details}): it was written "
                          f"by an earlier version. Use that version to resume or evaluate it, or train a new run")


def _local_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's streams: Python, NumPy, torch CPU, and the CUDA generator of its own device."""
    numpy_state = np.random.get_state(legacy=False)  # as tensors and ints, so weights_only loading accepts it
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_state(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """{"ranks": [each rank's own streams]}. Under torchrun a collective (all_gather_object): every rank
    calls it, and rank 0, which writes the checkpoint, holds them all."""
    local = _local_rng_state(device)
    if world_size == 1:
        return {"ranks": [local]}
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return {"ranks": gathered}


def set_rng_state(state: dict[str, Any], device: torch.device, rank: int = 0, seed: int = 0) -> None:
    """Restore this rank's own streams from rng_state()'s record, whatever process count wrote it.

    A rank the record has no entry for (resumed with more processes than saved) seeds itself from
    seed + rank, as a fresh run does, so no two ranks draw the same augmentation. Records from before
    per-rank saving hold rank 0's streams only, with the CUDA state of every device as a list.
    """
    ranks = state["ranks"] if "ranks" in state else [state]
    if rank >= len(ranks):
        seed_everything(seed + rank)
        log.info("rank %d: the checkpoint holds random streams for %d process(es); seeded from SEED + %d",
                 rank, len(ranks), rank)
        return
    own = ranks[rank]
    random.setstate(own["python"])
    numpy_state = dict(own["numpy"], state=dict(own["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(own["torch"])
    cuda = own.get("cuda")
    if isinstance(cuda, list):  # older format: one state per visible device of the saving process
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


# ---- Loop ----
@dataclass
class TrainState:
    """The run's progress and its account of every step; saved in each checkpoint, restored on resume."""

    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # batches of this epoch already trained on: where a resumed run starts
    step: int = 0  # steps attempted in the whole run (accepted + skipped)
    best_miou: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, whole run
    consecutive_skips: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0  # product of the LR back-offs of all rollbacks
    bad_batches_saved: int = 0
    fp16_overflows: int = 0  # fp16 steps GradScaler skipped while finding its scale: expected, not counted as skips
    accepted_since_snapshot: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # this epoch so far (for its metrics row)
    history: list[dict[str, float]] = field(default_factory=list)  # each finished epoch's metrics row (the verdict's)
    early_stop: str = ""  # why the run stopped before EPOCHS, if it did


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and last.pt was written."""


@dataclass
class Run:
    """Everything a training run holds; built by build_run(), used by fit()."""

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
    steps_per_epoch: int
    scaler: torch.amp.GradScaler | None = None
    state: TrainState = field(default_factory=TrainState)
    snapshot: dict[str, Any] | None = None  # last good training state, in CPU memory
    stop_signal: str | None = None  # set by the SIGTERM/SIGINT handler; checked after each step
    rank: int = 0
    world_size: int = 1  # processes under torchrun
    baselines: Baselines | None = None  # what a model that learned nothing scores on this data
    ema: WeightEMA | None = None  # the averaged weights that are evaluated and saved (EMA_DECAY > 0)
    auto_settings: tuple[str, ...] = ()  # the MACHINE_SETTINGS that were auto, resolved on this machine
    compile_pending: str | None = None  # COMPILE as asked (auto | on) until the first compiled step has run
    eval_compile_pending: str | None = None  # the same until the first compiled evaluation (eval mode: its own graph)

    def eval_model(self) -> nn.Module:
        """The model evaluations, prediction grids and best.pt's inference weights come from."""
        return self.ema.synced() if self.ema is not None else unwrap(self.model)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    def autocast(self):
        return autocast(self.cfg.amp, self.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (checkpoints hold the unwrapped state dict)."""
    return model.module if hasattr(model, "module") else model


def to_device(batch: dict[str, Any], run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if run.cfg.channels_last == "on" else torch.contiguous_format
    images = batch["image"].to(run.device, non_blocking=True).contiguous(memory_format=memory_format)
    masks = batch["mask"].to(run.device, non_blocking=True).long()  # [B, H, W]
    labels = torch.as_tensor(batch["label"]).to(run.device, non_blocking=True).long()  # [B]
    return images, masks, labels


def training_objective(model: nn.Module, loss_fn: StableLoss, images: torch.Tensor, masks: torch.Tensor,
                       labels: torch.Tensor, autocast=nullcontext) -> tuple[torch.Tensor, ...]:
    """(objective, loss, parts, cls_logits) of one training-mode forward. loss and parts are what is reported
    (comparable to the val loss); objective is what a step optimises and guards: loss plus one
    deep-supervision term for each aux head the model has (AUX_WEIGHT > 0)."""
    aux = bool(getattr(unwrap(model), "aux_heads", None))
    with autocast():
        outputs = model(images, aux=True) if aux else model(images)
    loss, parts = loss_fn(outputs[0], outputs[1], masks, labels)
    return (loss + loss_fn.aux(outputs[2], masks) if aux else loss), loss, parts, outputs[1]


def train_step(run: Run, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One guarded step. Returns [loss, seg, cls, grad_norm, reason, cls_correct] on the device, no host sync.

    With run.guard None the step is unguarded (every update applied): the benchmark's baseline.
    """
    model, optimizer, guard = run.model, run.optimizer, run.guard
    if guard is not None:
        guard.stash_buffers()
    optimizer.zero_grad(set_to_none=True)
    objective, loss, parts, cls_logits = training_objective(model, run.loss_fn, images, masks, labels, run.autocast)
    if run.scaler is not None:
        run.scaler.scale(objective).backward()
        run.scaler.unscale_(optimizer)
    else:
        objective.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm, foreach=True)  # pre-clip norm
    if guard is None:
        reason = torch.zeros((), dtype=torch.long, device=loss.device)
        optimizer.found_inf = None  # no verdict left over from a guarded step on this optimizer
    else:
        reason = guard.reason(objective.detach(), grad_norm)
        if run.world_size > 1:  # one verdict for all ranks, so their weights never drift apart
            torch.distributed.all_reduce(reason, op=torch.distributed.ReduceOp.MAX)
        skip = reason != 0
        optimizer.found_inf = skip.float()  # fused optimizers skip the update on the device when this is 1
        optimizer.grad_scale = None
    if guard is None and run.scaler is not None:
        # Unguarded fp16: only GradScaler.step hands the overflow flag of unscale_ to the optimizer;
        # a bare optimizer.step() would apply inf/NaN gradients.
        run.scaler.step(optimizer)
    else:
        optimizer.step()
    if run.scaler is not None:
        run.scaler.update()
    if guard is not None:
        guard.commit(skip, objective.detach(), grad_norm)
    if run.ema is not None:
        run.ema.update(skip if guard is not None else torch.zeros((), dtype=torch.bool, device=loss.device))
    run.scheduler.step()
    correct = (cls_logits.detach().argmax(1) == labels).float().sum()
    return torch.stack([loss.detach().float(), parts["seg"], parts["cls"], grad_norm.float(),
                        reason.float(), correct])


def compile_in_place(modules: Iterable[nn.Module | None]) -> None:
    """nn.Module.compile() each module: state dicts keep their plain keys, and whoever calls the module
    (training, evaluation, DDP) calls the compiled forward. Tracing and compilation happen at the first call."""
    for module in modules:
        if module is not None:
            module.compile()


def uncompile(modules: Iterable[nn.Module | None]) -> None:
    """Undo compile_in_place: the modules' forward runs eagerly again."""
    for module in modules:
        if module is not None:
            module._compiled_call_impl = None


def error_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def compile_failed(run: Run, asked: str, where: str, err: Exception, eager: Callable[[], Any]) -> Any:
    """The first compiled call failed with err. Un-compile the model (and the EMA model) and run the same work
    eagerly, which tells whose error it was: if the eager run fails too, the error is the step's own (a bug,
    a bad batch) and the eager one propagates as it is, never labelled a compilation failure. Otherwise
    compilation failed: under COMPILE on stop the run (exit 2); under auto log a WARN line naming err and
    return the eager result, the run going on eagerly."""
    uncompile([unwrap(run.model), run.ema.module if run.ema is not None else None])
    run.compile_pending = run.eval_compile_pending = None
    what = error_line(err)
    traceback.clear_frames(err.__traceback__)  # free the failed attempt's tensors before the eager one needs memory
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        result = eager()
    except Exception:
        log.error("compile: %s failed when compiled (%s) and again when run eagerly: the error below is "
                  "reported as the step's own. A CUDA fault (illegal memory access, device-side assert) "
                  "can outlive a miscompiled kernel: if it is one, run once with --compile off to tell", where, what)
        raise
    if asked == "on":
        raise ConfigError(f"compile: torch.compile failed in {where} ({what}), which runs eagerly; run with "
                          f"--compile off (or auto, which falls back to eager)") from err
    run.cfg.compile = "off"
    log.warning("compile auto: torch.compile failed in %s (%s); going on without it (eager). --compile off "
                "skips the attempt", where, what)
    return result


def first_compiled_step(run: Run, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """train_step of a compiled model for the first time: torch.compile traces and compiles here (logged
    with its time). If that fails, the training state goes back to where it was before the step and
    compile_failed runs the step again eagerly and decides."""
    asked, saved, started = run.compile_pending, take_snapshot(run), time.perf_counter()
    run.compile_pending = None
    try:
        result = train_step(run, images, masks, labels)
        result.tolist()  # wait for the step: the time below is the compilation's, and errors surface here
    except Exception as err:  # dynamo and inductor raise many types; the chained traceback keeps the cause
        restore_training_state(run, saved)
        return compile_failed(run, asked, "the first training step", err,
                              lambda: train_step(run, images, masks, labels))
    log.info("compile: the first step (tracing and compilation) took %.1f s", time.perf_counter() - started)
    return result


def evaluate_run(run: Run, model: nn.Module) -> dict[str, Any]:
    """evaluate() on the val split; the first one of a compiled model compiles the eval-mode graph (logged
    with its time; a failure goes to compile_failed, which evaluates again eagerly and decides)."""
    args = (run.val_loader, run.loss_fn, run.cfg, run.device, run.autocast)
    if run.eval_compile_pending is None:
        return evaluate(model, *args)
    asked, started = run.eval_compile_pending, time.perf_counter()
    run.eval_compile_pending = None
    try:
        val = evaluate(model, *args)
    except Exception as err:  # as in first_compiled_step; evaluation changes no state, so nothing to restore
        return compile_failed(run, asked, "the first evaluation", err, lambda: evaluate(model, *args))
    log.info("compile: the first evaluation (with the eval-mode graph's compilation) took %.1f s",
             time.perf_counter() - started)
    return val


def _append_jsonl(run: Run, records: list[dict[str, Any]]) -> None:
    if run.is_main:
        with open(run.run_dir / "steps.jsonl", "a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


FP16_OVERFLOW = "fp16 overflow"
# Below this loss scale a non-finite fp16 gradient is no longer GradScaler probing: the gradients are
# non-finite even unscaled, a fault the skip limits must see.
FP16_MIN_CALIBRATION_SCALE = 1.0


def _skip_name(run: Run, reason: int, scale: float = math.inf) -> str:
    # Under fp16 a non-finite gradient is usually GradScaler probing its scale (it starts at 65536 and
    # halves on each overflow, grows every 2000 clean steps), not divergence.
    calibrating = run.scaler is not None and scale >= FP16_MIN_CALIBRATION_SCALE
    return FP16_OVERFLOW if reason == 2 and calibrating else SKIP_REASONS[reason]


def _account_step(run: Run, epoch: int, step: int, row: list[float], batch: dict[str, Any],
                  scale: float = math.inf) -> dict | None:
    """Add one step to the epoch's sums and the skip counters; return its skip event, if it was skipped.

    scale: the fp16 loss scale at the end of the interval (inf without a GradScaler).
    """
    state, sums = run.state, run.state.epoch_sums
    loss, seg, cls, grad_norm, reason, correct = row
    images = len(batch["label"])
    if not reason:
        state.consecutive_skips = 0
        state.accepted_since_snapshot += 1
        for key, value in (("loss", loss * images), ("seg", seg * images), ("cls", cls * images),
                           ("correct", correct), ("images", images)):
            sums[key] = sums.get(key, 0.0) + value
        return None
    name = _skip_name(run, int(reason), scale)
    if name == FP16_OVERFLOW:  # calibration: counted apart, no bad-batch file, no step toward the skip limits
        sums["fp16_overflows"] = sums.get("fp16_overflows", 0) + 1
        state.fp16_overflows += 1
        log.info("step %d: fp16 overflow, GradScaler skipped it and lowered its scale to %g (calibration, "
                 "not counted as a skipped step)", step, scale)
        return None
    sums["skipped"] = sums.get("skipped", 0) + 1
    state.skipped[name] = state.skipped.get(name, 0) + 1
    state.consecutive_skips += 1
    log.warning("step %d skipped: %s (loss %.4g, grad norm %.4g)", step, name, loss, grad_norm)
    event = {"event": "skip", "step": step, "epoch": epoch, "reason": name, "loss": loss, "grad_norm": grad_norm}
    if state.bad_batches_saved < run.cfg.bad_batch_limit and run.is_main:
        path = run.run_dir / "bad_batches" / f"step_{step}.pt"
        save_bad_batch(path, batch, step=step, epoch=epoch, reason=name, loss=loss, grad_norm=grad_norm,
                       lr=run.scheduler.get_last_lr()[0], amp=run.cfg.amp, model=run.model,
                       weights_step=state.step, cfg=run.cfg)
        state.bad_batches_saved += 1
        event["file"] = str(path)
    return event


def flush_interval(run: Run, epoch: int, pending: list[torch.Tensor], batches: list[dict[str, Any]],
                   started: float) -> dict[str, Any]:
    """Read the interval's step records (the one host sync), account for them, and climb the ladder:
    skip (already done on the device) -> roll back -> abort. Returns the interval's log record."""
    cfg, state = run.cfg, run.state
    params = list(unwrap(run.model).parameters())
    finite = torch.stack(torch._foreach_norm(params)).isfinite().all().float().view(1)
    stop = torch.tensor([float(run.stop_signal is not None)], device=finite.device)
    # GradScaler has no public getter that does not sync; its scale tensor rides along in the one read.
    scale = (run.scaler._get_scale_async().float().view(1) if run.scaler is not None
             else torch.full((1,), math.inf, device=finite.device))
    table = torch.cat([torch.stack(pending).flatten(), finite, stop, scale.to(finite.device)])
    if run.world_size > 1:  # average losses over ranks; verdicts and scales are equal already; agree on finite and stop
        torch.distributed.all_reduce(table)
        table /= run.world_size
    table = table.cpu()
    rows, params_finite = table[:-3].view(len(pending), -1).tolist(), bool(table[-3] == 1.0)
    scale_now = float(table[-1])
    if table[-2] > 0 and run.stop_signal is None:
        run.stop_signal = "SIGTERM"  # another rank was asked to stop: every rank stops at this same step
    first = state.step
    events, run_of_skips = [], ""
    for i, (row, batch) in enumerate(zip(rows, batches)):
        if (event := _account_step(run, epoch, first + i, row, batch, scale_now)) is not None:
            events.append(event)
        # Counted per step, so the rollback follows exactly max_consecutive_skips skips in a row, also when
        # they straddle two intervals or an accepted step follows them in the same interval. It is carried
        # out at this flush (the snapshot is on the host); later steps of the interval ran on the weights it
        # discards, so they do not count towards the next one (roll_back resets the counter).
        if not run_of_skips and state.consecutive_skips >= cfg.max_consecutive_skips:
            run_of_skips = f"{state.consecutive_skips} consecutive skipped steps (the last at step {first + i})"
    state.step += len(rows)
    state.batch += len(rows)
    # The schedule counts applied updates: take back the steps skipped in this interval.
    skipped = sum(1 for row in rows if row[4])
    if skipped:
        run.scheduler.last_epoch -= skipped
        run.scheduler.refresh()
    abort = None
    if not params_finite or run_of_skips:
        try:
            events.append(roll_back(run, "parameters became non-finite" if not params_finite else run_of_skips))
        except TrainingFailed as err:
            abort = err  # raised once this interval's skips and steps are in steps.jsonl (diagnose reads them)
    elif not skipped and state.accepted_since_snapshot >= cfg.snapshot_every:
        run.snapshot = take_snapshot(run)
        state.accepted_since_snapshot = 0
    last = rows[-1]
    images = sum(len(b["label"]) for b in batches)
    record = {"event": "log", "step": state.step, "epoch": epoch, "loss": last[0], "seg_loss": last[1],
              "cls_loss": last[2], "grad_norm": last[3], "lr": run.scheduler.get_last_lr()[0],
              "skipped_epoch": int(state.epoch_sums.get("skipped", 0)),
              "fp16_overflows_epoch": int(state.epoch_sums.get("fp16_overflows", 0)), "rollbacks": state.rollbacks,
              "images_per_s": images * run.world_size / max(time.perf_counter() - started, 1e-9),
              "stop": run.stop_signal is not None}
    _append_jsonl(run, events + [record])
    if abort is not None:
        raise abort
    if state.epoch_sums.get("skipped", 0) > cfg.max_skip_fraction * run.steps_per_epoch:
        raise TrainingFailed(
            f"{int(state.epoch_sums['skipped'])} of {run.steps_per_epoch} steps in epoch {epoch + 1} were skipped "
            f"(more than max_skip_fraction={cfg.max_skip_fraction}); reasons so far: {state.skipped}. Training is "
            f"not learning: every skip is in {run.run_dir / 'steps.jsonl'}. {replay_hint(run)}")
    if cfg.checkpoint_every and state.step // cfg.checkpoint_every > first // cfg.checkpoint_every:
        save_checkpoint(run.run_dir / "last.pt", checkpoint_payload(run), run.is_main)
    return record


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train (the rest of) one epoch; host syncs only every LOG_INTERVAL steps."""
    cfg, state = run.cfg, run.state
    run.model.train()
    run.train_loader.sampler.set_epoch(epoch, start_batch=state.batch)
    if state.batch == 0:
        state.epoch_sums = {}
    pending: list[torch.Tensor] = []
    batches: list[dict[str, Any]] = []  # kept until the flush, to save the ones whose step was skipped
    started = time.perf_counter()
    # A bar for a person at a terminal; a log file or a CI log gets a plain line every tenth of the epoch.
    interactive = run.is_main and sys.stderr.isatty()
    bar = tqdm(total=run.steps_per_epoch, initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               leave=False, disable=not interactive, file=sys.stderr)
    tenths_shown = state.batch * 10 // run.steps_per_epoch
    for batch in run.train_loader:
        images, masks, labels = to_device(batch, run)
        step = train_step if run.compile_pending is None else first_compiled_step
        pending.append(step(run, images, masks, labels))
        batches.append(batch)
        done = state.batch + len(pending) >= run.steps_per_epoch
        # A lone process stops right after the step it was signalled in; under torchrun ranks agree at
        # the next log interval, so that all of them stop after the same step.
        stop_now = run.stop_signal is not None and run.world_size == 1
        if len(pending) >= cfg.log_interval or done or stop_now:
            record = flush_interval(run, epoch, pending, batches, started)
            # The flush record's numbers: no host sync beyond the flush's own.
            bar.update(len(pending))
            bar.set_postfix({"step": record["step"], "loss": f"{record['loss']:.3f}",
                             "img/s": f"{record['images_per_s']:.0f}", "skipped": record["skipped_epoch"]})
            tenths = state.batch * 10 // run.steps_per_epoch
            if run.is_main and not interactive and tenths > tenths_shown and state.batch < run.steps_per_epoch:
                tenths_shown = tenths
                log.info("epoch %d/%d  step %d/%d of the epoch (%d%%)  loss %.4f  %.0f img/s  skipped %d", epoch + 1,
                         cfg.epochs, state.batch, run.steps_per_epoch, 100 * state.batch // run.steps_per_epoch,
                         record["loss"], record["images_per_s"], record["skipped_epoch"])
            pending, batches, started = [], [], time.perf_counter()
            if record["stop"]:
                bar.close()
                raise StopRequested(run.stop_signal)
    bar.close()
    sums = state.epoch_sums
    n = sums.get("images", 0)
    return {"train_loss": sums["loss"] / n if n else float("nan"),
            "train_seg_loss": sums["seg"] / n if n else float("nan"),
            "train_cls_loss": sums["cls"] / n if n else float("nan"),
            "train_cls_acc": sums["correct"] / n if n else float("nan"),
            "skipped_steps": int(sums.get("skipped", 0)), "fp16_overflows": int(sums.get("fp16_overflows", 0))}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: StableLoss, cfg: Config, device: torch.device,
             autocast=nullcontext) -> dict[str, Any]:
    """Loss and confusion matrices over the loader, reduced once at the end (all-reduced under torchrun).

    The Dice term is scored over the whole split from summed intersections and areas, not averaged over
    batches, so the val loss does not depend on the batch size or the number of processes.
    """
    model.eval()
    seg_cm = torch.zeros(cfg.num_seg_classes, cfg.num_seg_classes, dtype=torch.long, device=device)
    cls_cm = torch.zeros(cfg.num_cls_classes, cfg.num_cls_classes, dtype=torch.long, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # seg cross-entropy, cls (x images), images
    dice = torch.zeros(3, cfg.num_seg_classes, dtype=torch.float64, device=device)  # dice_sums over the split
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        labels = torch.as_tensor(batch["label"]).to(device, non_blocking=True).long()
        with autocast():
            seg_logits, cls_logits = model(images)
        _, parts = loss_fn(seg_logits, cls_logits, masks, labels)
        n = images.shape[0]
        sums[:2] += torch.stack([parts["seg_ce"], parts["cls"]]).double() * n
        sums[2] += n
        if "dice_sums" in parts:
            dice += parts["dice_sums"].double()
        seg_cm += confusion_matrix(seg_logits.argmax(1), masks, cfg.num_seg_classes, cfg.ignore_index)
        cls_cm += confusion_matrix(cls_logits.argmax(1), labels, cfg.num_cls_classes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (seg_cm, cls_cm, sums, dice):
            torch.distributed.all_reduce(tensor)
    seg_ce, cls_loss = sums[:2] / sums[2].clamp_min(1)
    total, seg_loss = loss_fn.combine(seg_ce, dice if loss_fn.dice_weight else None, cls_loss)
    seg_np, cls_np = seg_cm.cpu().numpy(), cls_cm.cpu().numpy()
    val_loss, val_seg_loss, val_cls_loss = torch.stack([total, seg_loss, cls_loss]).tolist()  # one host sync
    result: dict[str, Any] = {"val_loss": val_loss, "val_seg_loss": val_seg_loss, "val_cls_loss": val_cls_loss}
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


def checkpoint_payload(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    return {"format": CHECKPOINT_FORMAT, **training_state(run), "state": asdict(run.state), "config": cfg.to_dict(),
            "auto_settings": list(run.auto_settings),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "class_names": class_names(cfg)}


def resume(run: Run, payload: dict[str, Any]) -> None:
    """Put a run back exactly where a checkpoint left it (weights, optimizer, schedule, RNG, data position)."""
    restore_training_state(run, payload)  # the schedule's shape is this run's settings: --epochs M continues it to M
    run.state = TrainState(**payload["state"])
    if run.cfg.warmup_epochs == payload["config"]["warmup_epochs"]:  # a warm-up that --epochs M would shorten
        run.scheduler.warmup_steps = payload["scheduler"]["warmup_steps"]  # less is the run's (no second one)
        run.scheduler.refresh()


def _end_epoch(run: Run, epoch: int, train: dict[str, float], start: float) -> dict[str, Any]:
    """Evaluate, write the metrics row and checkpoints, update the early-stopping counters."""
    cfg, state = run.cfg, run.state
    model = run.eval_model()
    if cfg.bn_recalibrate > 0:
        recalibrate_bn(model, run.train_loader, cfg.bn_recalibrate, run.device)
        if run.ema is not None:
            run.ema.recalibrated = True
    if run.world_size > 1:  # evaluate (and save) rank 0's BN statistics everywhere, as DDP's forward would
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    val = evaluate_run(run, model)
    state.epoch, state.batch = epoch + 1, 0
    row = {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[0], **train, "rollbacks": state.rollbacks,
           **{k: v for k, v in val.items() if not k.endswith("_cm")}, "seconds": time.perf_counter() - start}
    state.history.append({k: float(v) for k, v in row.items() if k in METRIC_COLUMNS})
    uniform = run.baselines.uniform_loss if run.baselines else math.inf
    if epoch + 1 > effective_warmup_epochs(cfg) and not row["train_loss"] < uniform:
        log.warning("epoch %d: mean train loss %.4f is above the loss of a uniform guess (%.4f) after warm-up: the "
                    "learning rate (%.3g now, base_lr %g) is probably too high", epoch + 1, row["train_loss"], uniform,
                    row["lr"], cfg.base_lr)
    improved = val["val_miou"] > state.best_miou
    if improved:
        state.best_miou, state.best_epoch, state.epochs_since_best = val["val_miou"], epoch + 1, 0
    else:
        state.epochs_since_best += 1
    if state.epochs_since_best >= cfg.patience and epoch + 1 < cfg.epochs:  # decided before last.pt is written,
        state.early_stop = (f"no better val mIoU for {cfg.patience} epochs (best {state.best_miou:.4f} at epoch "
                            f"{state.best_epoch})")  # so a resume of this run knows it is over
    if run.is_main:
        write_metrics_row(run.run_dir / "metrics.csv", row)
    names = class_names(cfg)
    log.info("epoch %d/%d  loss %.4f (seg %.4f cls %.4f)  val loss %.4f  mIoU %.4f  pixel acc %.4f  "
             "cls acc %.4f (train-mode %.4f)  F1 %.4f  skipped %d  lr %.2e  %.1fs%s",
             epoch + 1, cfg.epochs, row["train_loss"], row["train_seg_loss"], row["train_cls_loss"],
             row["val_loss"], row["val_miou"], row["val_pixel_acc"], row["val_cls_acc"], row["train_cls_acc"],
             row["val_cls_f1"], row["skipped_steps"], row["lr"], row["seconds"], "  *best*" if improved else "")
    log.info("%s\n%s", format_table("segmentation (val)", val["seg_cm"], names["seg"], "IoU"),
             format_table("classification (val)", val["cls_cm"], names["cls"], "F1"))
    payload = checkpoint_payload(run)
    row["saved"] = save_checkpoint(run.run_dir / "last.pt", payload, run.is_main)
    if improved:
        save_checkpoint(run.run_dir / "best.pt", payload, run.is_main)
    return row


def fit(run: Run) -> dict[str, Any]:
    """Epochs of train_one_epoch + evaluation, from wherever run.state says the run is."""
    cfg, state = run.cfg, run.state
    run.snapshot = take_snapshot(run)
    row: dict[str, Any] = {}
    # The whole val split (the loader holds this rank's shard): the grid shows its first images on any world size.
    recorder = ResultsRecorder(cfg, run.run_dir, run.eval_model(), run.val_loader.dataset.dataset, run.device,
                               active=run.is_main)
    for epoch in range(state.epoch, cfg.epochs if not state.early_stop else state.epoch):
        state.epoch = epoch
        start = time.perf_counter()
        try:
            train = train_one_epoch(run, epoch)
        except StopRequested:
            save_checkpoint(run.run_dir / "last.pt", checkpoint_payload(run), run.is_main)
            raise
        row = _end_epoch(run, epoch, train, start)
        recorder.record_epoch(epoch + 1, row)
        if state.early_stop:
            log.info("early stop: %s", state.early_stop)
            break
    recorder.close()
    if row and not row["saved"]:
        raise TrainingFailed(f"the final checkpoint could not be written to {run.run_dir / 'last.pt'} "
                             f"(see the error above); the previous one is kept")
    return row


# ---- Eval and predict ----
_INVOCATION_KEYS = {"device", "num_workers", "out_dir", "resume", "vis_every", "vis_samples", "tensorboard",
                    "eval_only", "checkpoint", "predict", "out", "export"}
EXPORT_FORMAT = "adaptivestream-export/1"  # tag of the PATH.json that --export writes beside its file
EXPORT_OUTPUTS = ("seg_logits", "cls_logits")
# An exported file is checked against its eager model at these inputs [B, H, W] and at the checkpoint's image
# size: batches of 1 and more, a multiple of 32, odd sizes that take the pad-and-crop path, and a side under 32
# (a 1-pixel bottleneck). A graph that holds only near its example input fails here, not in use.
EXPORT_CHECK_SHAPES = ((2, 64, 64), (1, 77, 131), (3, 31, 45))
# float32 logits. torch.export on the CPU runs the eager kernels (measured difference 0); ONNX Runtime fuses and
# reorders sums (measured < 5e-6 on a trained default model). A wrong weight, normalisation or BatchNorm mode
# moves logits by > 1e-2.
EXPORT_ATOL, EXPORT_RTOL = 1e-4, 1e-4


def given_settings(argv: list[str]) -> set[str]:
    """Lower-case names of the settings this command line sets, by flag or in its --config file."""
    args, _ = build_parser().parse_known_args(argv)
    given = {name.lower() for name in vars(args) if name != "config"}
    if getattr(args, "config", None):  # load_config has already checked that the file is a mapping
        given |= {str(key) for key in yaml.safe_load(Path(args.config).read_text()) or {}}
    return given


def checkpoint_settings(cfg: Config, payload: dict[str, Any], argv: list[str] | None) -> Config:
    """cfg with a checkpoint's saved settings, except those this command line gives (flags or --config), the
    command's own (device, output, logging) and the MACHINE_SETTINGS that were auto where it was written (this
    machine resolves them again; a checkpoint from before that record keeps what they became)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    kept = given_settings(argv) | _INVOCATION_KEYS | set(payload.get("auto_settings", ()))
    values = cfg.to_dict()
    values.update({k: v for k, v in payload["config"].items() if k in values and k not in kept})
    merged = Config(**values)
    validate(merged)
    return merged


def inference_config(cfg: Config, argv: list[str] | None) -> tuple[Config, dict[str, Any]]:
    """(config, checkpoint) for --eval-only / --predict: the checkpoint's training settings, except those
    this command line gives and the command's own (device, output); checked against the checkpoint."""
    payload = load_checkpoint(cfg.checkpoint)
    merged = checkpoint_settings(cfg, payload, argv)
    check_fits(cfg.checkpoint, payload, merged)  # names any architecture setting given differently
    return merged, payload


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON has no NaN


def write_confusion_csv(path: Path, cm: np.ndarray, names: list[str]) -> None:
    """Rows = true class, columns = predicted class, with the class names as headers."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *names])
        writer.writerows([name, *map(int, counts)] for name, counts in zip(names, cm))


def evaluate_checkpoint(cfg: Config, argv: list[str] | None) -> int:
    """--eval-only: val metrics and per-class tables of --checkpoint; eval.json and confusion CSVs to --out."""
    cfg, payload = inference_config(cfg, argv)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    cfg.compile = "off"  # one pass over the val split: compiling would cost more than it saves
    run = build_run(cfg, out, from_checkpoint=True)
    unwrap(run.model).load_state_dict(inference_weights(payload))  # checkpoints hold the model outside DDP
    # Each rank evaluates its shard; evaluate() all-reduces the sums, so every rank has the totals.
    val = evaluate(unwrap(run.model), run.val_loader, run.loss_fn, cfg, run.device, run.autocast)
    if not run.is_main:
        return 0
    names = class_names(cfg)
    log.info("%s\n%s", format_table("segmentation (val)", val["seg_cm"], names["seg"], "IoU"),
             format_table("classification (val)", val["cls_cm"], names["cls"], "F1"))
    metrics = {k: _finite_or_none(float(v)) for k, v in val.items() if not k.endswith("_cm")}
    per_class = {}
    for head, cm in (("seg", val["seg_cm"]), ("cls", val["cls_cm"])):
        scores = per_class_scores(cm)
        per_class[head] = {name: {key: int(scores[key][i]) if key == "support" else _finite_or_none(scores[key][i])
                                  for key in scores} for i, name in enumerate(names[head])}
        write_confusion_csv(out / f"confusion_{head}.csv", cm, names[head])
    report = {"checkpoint": str(cfg.checkpoint), "epoch": payload["state"]["epoch"],
              "step": payload["state"]["step"], "metrics": metrics, "per_class": per_class}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("val loss %.4f  mIoU %.4f  pixel acc %.4f  cls acc %.4f  F1 %.4f  (checkpoint %s, epoch %d); "
             "wrote eval.json, confusion_seg.csv, confusion_cls.csv to %s", val["val_loss"], val["val_miou"],
             val["val_pixel_acc"], val["val_cls_acc"], val["val_cls_f1"], cfg.checkpoint, report["epoch"], out)
    return 0


def list_images(path: Path) -> list[Path]:
    """PATH itself, or the image files directly inside the folder PATH, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"predict: {path} does not exist; give an image file or a folder of images")
    files = image_files(path, "both would write the same masks/<stem>.png; rename one or predict them separately")
    if not files:
        raise DataError(f"predict: no image files in {path} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path: Path) -> torch.Tensor | None:
    """uint8 RGB [3, H, W], or None (logged with the file name) if the file is not a readable image."""
    try:
        return pil_to_tensor(open_image(path))
    except DataError as err:
        log.error("%s; skipped", err)
        return None


@torch.no_grad()
def predict_image(model: nn.Module, transform: v2.Transform, image: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor, int, float]:
    """Class-index mask [H, W] at the image's own size, predicted class and its softmax probability."""
    x = transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)[None].to(device)  # [1, 3, S, S]
    seg_logits, cls_logits = model(x)
    # The model sees the whole image at the training size. Back at the original size the
    # logits are interpolated (bilinear) and then argmax'ed, as torchvision's segmentation models do:
    # smoother edges than nearest on the argmax, and no invented class (interpolating indices would).
    seg_logits = F.interpolate(seg_logits.float(), size=tuple(image.shape[-2:]), mode="bilinear",
                               align_corners=False)
    probs = cls_logits.float().softmax(1)[0]  # [C]
    return seg_logits.argmax(1)[0].cpu(), int(probs.argmax()), float(probs.max())


def read_export_info(path: Path) -> dict[str, Any]:
    """The PATH.json that --export wrote beside PATH, checked for its tag; CheckpointError naming the file."""
    info_path = export_info_path(path)
    if not info_path.is_file():
        raise CheckpointError(f"{info_path} does not exist: --predict with {path.name} reads the normalisation, "
                              f"class names and image size from the JSON that --export writes beside it")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{info_path} is not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{info_path} is not the description of an --export file (no {EXPORT_FORMAT!r} tag)")
    return info


def load_exported(path: Path) -> nn.Module:
    """The graph in a .pt2 file of --export as a module: runs without the model definition."""
    if not path.is_file():
        raise CheckpointError(f"exported model {path} does not exist")
    try:
        return torch.export.load(path).module()
    except Exception as err:  # truncated zip, foreign file, unknown serialisation version: all mean "cannot use"
        raise CheckpointError(f"exported model {path} cannot be loaded ({type(err).__name__}: {err}); export it "
                              f"again with this torch ({torch.__version__})") from None


def load_predictor(cfg: Config, argv: list[str] | None) -> tuple[Config, nn.Module, dict[str, Any], dict[str, Any]]:
    """(config, model in eval mode on cfg.device, normalisation, class names) for --predict, from a checkpoint or
    from a .pt2 of --export and its JSON, whose image size applies unless this command line gives one."""
    device = use_device(cfg.device)
    if Path(cfg.checkpoint).suffix == ".pt2":
        model = load_exported(Path(cfg.checkpoint)).to(device)  # traced in eval mode: no .eval() needed
        info = read_export_info(Path(cfg.checkpoint))
        if "image_size" not in given_settings(sys.argv[1:] if argv is None else list(argv)):
            cfg.image_size = info["input"]["image_size"]
        return cfg, model, {"mean": info["input"]["mean"], "std": info["input"]["std"]}, info["class_names"]
    cfg, payload = inference_config(cfg, argv)
    model = build_model(cfg, from_checkpoint=True).to(device)
    model.load_state_dict(inference_weights(payload))
    model.eval()
    return cfg, model, payload["normalization"], payload["class_names"]


def predict_images(cfg: Config, argv: list[str] | None) -> int:
    """--predict: masks, overlays and predictions.csv for an image or a folder; 2 if any image failed."""
    cfg, model, norm, names = load_predictor(cfg, argv)
    files = list_images(Path(cfg.predict))
    device = resolve_device(cfg.device)
    transform = v2.Compose([v2.Resize((cfg.image_size, cfg.image_size), antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(norm["mean"], norm["std"])])
    palette = seg_palette(len(names["seg"]))
    out = Path(cfg.out)
    rows, failed = [], []
    for file in tqdm(files, desc="predict", leave=False, disable=None, file=sys.stderr):
        image = read_image(file)
        if image is None:
            failed.append(file.name)
            continue
        mask, label, confidence = predict_image(model, transform, image, device)
        dtype = np.uint8 if len(names["seg"]) <= 256 else np.uint16
        save_png(Image.fromarray(mask.numpy().astype(dtype)), out / "masks" / f"{file.stem}.png")
        save_png(overlay_mask(image, mask, palette), out / "overlays" / f"{file.stem}.png")
        rows.append({"file": str(file), "label": label, "class_name": names["cls"][label],
                     "confidence": f"{confidence:.6f}"})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "class_name", "confidence"])
        writer.writeheader()
        writer.writerows(rows)
    log.info("predicted %d of %d images with %s: masks/, overlays/ and predictions.csv in %s",
             len(rows), len(files), cfg.checkpoint, out)
    if failed:
        log.error("%d image(s) could not be read and were skipped: %s", len(failed), ", ".join(failed))
        return 2
    return 0


def export_info_path(path: str | Path) -> Path:
    """PATH.json beside an exported PATH (model.pt2 -> model.pt2.json): a .pt2 and an .onnx of one name keep theirs."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def require_onnx() -> None:
    """Stop (exit 2) before any work unless the ONNX exporter and the runtime that checks its file import."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"export: writing .onnx needs {', '.join(missing)} (onnx and onnxscript write the file, "
                          f"onnxruntime checks it against the model): pip install onnx onnxscript onnxruntime")


def trace_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write model to path (.pt2 or .onnx) as one graph for any batch, height and width (each >= 1)."""
    from torch.fx.experimental import _config as fx_config

    dims = ({0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=1),
             3: torch.export.Dim("width", min=1)},)
    # backed_size_oblivious is export's (experimental) switch against 0/1 specialisation. Without it the trace
    # keeps facts of its example input as guards: a bottleneck wider than 1 pixel (a side over 32) and whether
    # the crop is a no-op (a side that is a multiple of 32), so the file would refuse other sizes.
    # EXPORT_CHECK_SHAPES then checks that the graph holds at such sizes.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        if path.suffix == ".onnx":
            # external_data=False: one self-contained file (ONNX's 2 GB limit is far above this model)
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                              output_names=list(EXPORT_OUTPUTS), dynamic_shapes=dims, external_data=False,
                              verbose=False)
        else:
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dims), path)


def exported_runner(path: Path) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The file at path as a function of a CPU batch: what a deployment loads, not the trace in memory."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: [torch.from_numpy(o) for o in session.run(list(EXPORT_OUTPUTS), {"images": x.numpy()})]
    module = load_exported(path)
    return lambda x: list(module(x))


def compare_export(model: nn.Module, run: Callable[[torch.Tensor], list[torch.Tensor]],
                   shapes: Iterable[tuple[int, int, int]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Max |exported - eager| per output per input [B, H, W] ("BxHxW"), and the checks that failed."""
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, dict[str, float]] = {}
    failures = []
    for batch, height, width in shapes:
        key = f"{batch}x{height}x{width}"
        x = torch.randn(batch, 3, height, width, generator=generator)  # normalised images are about N(0, 1)
        with torch.no_grad():
            expected = model(x)
            try:
                got = run(x)
            except Exception as err:  # a guard or kernel of the exported file refused this input: a failed check
                failures.append(f"{key}: the exported model raised {type(err).__name__}: {err}")
                continue
        figures[key] = {}
        for name, want, have in zip(EXPORT_OUTPUTS, expected, got):
            if have.shape != want.shape:
                failures.append(f"{key} {name}: shape {tuple(have.shape)}, eager {tuple(want.shape)}")
                continue
            figures[key][name] = float((have - want).abs().max())
            if not torch.allclose(have, want, atol=EXPORT_ATOL, rtol=EXPORT_RTOL):
                failures.append(f"{key} {name}: max |diff| {figures[key][name]:.3g}")
    return figures, failures


def export_info(cfg: Config, payload: dict[str, Any], path: Path, figures: dict[str, dict[str, float]],
                seconds: float) -> dict[str, Any]:
    """The contract of an exported file, written beside it as PATH.json (docs/export.md)."""
    norm = payload["normalization"]
    return {
        "format": EXPORT_FORMAT, "file": path.name,
        "program": ("ONNX: onnxruntime.InferenceSession(file)" if path.suffix == ".onnx"
                    else "torch.export ExportedProgram: torch.export.load(file).module()"),
        "checkpoint": str(cfg.checkpoint), "epoch": payload["state"]["epoch"], "step": payload["state"]["step"],
        "torch_version": torch.__version__,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "channel_order": "RGB",
                  "value_range": [0.0, 1.0], "mean": norm["mean"], "std": norm["std"],
                  "normalize": "(x - mean) / std per channel, x in value_range", "image_size": cfg.image_size,
                  "dynamic": ["batch", "height", "width"]},
        "outputs": [{"name": "seg_logits", "shape": ["B", cfg.num_seg_classes, "H", "W"]},
                    {"name": "cls_logits", "shape": ["B", cfg.num_cls_classes]}],
        "class_names": payload["class_names"],
        "check": {"atol": EXPORT_ATOL, "rtol": EXPORT_RTOL, "max_abs_diff": figures},
        "export_seconds": round(seconds, 3), "bytes": path.stat().st_size,
    }


def export_model(cfg: Config, argv: list[str] | None) -> int:
    """--export PATH: --checkpoint's model as PATH (.pt2 or .onnx) and PATH.json; 1 if the file does not
    reproduce the model within EXPORT_ATOL / EXPORT_RTOL at EXPORT_CHECK_SHAPES (then nothing is written)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # torchrun: one file per command, written by rank 0
    path = Path(cfg.export)
    if path.suffix == ".onnx":
        require_onnx()
    cfg, payload = inference_config(cfg, argv)
    model = build_model(cfg, from_checkpoint=True)
    model.load_state_dict(inference_weights(payload))
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # an older PATH stays until the new file has passed
    start = time.perf_counter()
    try:
        trace_export(model, torch.zeros(2, 3, cfg.image_size, cfg.image_size), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file left behind; the error itself goes on
        raise
    seconds = time.perf_counter() - start
    figures, failures = compare_export(model, exported_runner(tmp),
                                       EXPORT_CHECK_SHAPES + ((1, cfg.image_size, cfg.image_size),))
    for key, diffs in figures.items():
        log.info("check %s: max |exported - eager| %s", key, ", ".join(f"{n} {d:.3g}" for n, d in diffs.items()))
    if failures:
        tmp.unlink()
        log.error("the exported model does not match %s (float32 tolerance atol %g + rtol %g x |eager|): %s; "
                  "%s not written", cfg.checkpoint, EXPORT_ATOL, EXPORT_RTOL, "; ".join(failures), path)
        return 1
    os.replace(tmp, path)
    info = export_info(cfg, payload, path, figures, seconds)
    export_info_path(path).write_text(json.dumps(info, indent=2) + "\n")
    log.info("exported %s to %s (%.2f MB) in %.1f s; equal to the model within atol %g / rtol %g at %s; "
             "input contract and class names in %s", cfg.checkpoint, path, info["bytes"] / 1e6, seconds,
             EXPORT_ATOL, EXPORT_RTOL, ", ".join(figures), export_info_path(path))
    return 0


# ---- main ----
def resolve_device(name: str) -> torch.device:
    """auto -> cuda:0 if available else cpu; raise ConfigError naming the devices this machine has. A CUDA
    device always has an index (cuda -> cuda:0, as in a fresh process): torch.cuda.set_device needs one."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    have = "cpu" + "".join(f", cuda:{i}" for i in range(count)) + " (or auto)"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not a device this script trains on; this machine has: {have}")
    if device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
        raise ConfigError(f"device: {name!r} requested but " + ("CUDA is not available" if count == 0 else
                          f"there are only {count} CUDA device(s)") + f"; this machine has: {have}")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def use_device(name: str) -> torch.device:
    """resolve_device, made the current CUDA device: pinned memory and other implicit CUDA calls use the current
    device, and would otherwise create a context on GPU 0 (for --device cuda:1, say)."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(cfg: Config, device: torch.device) -> None:
    """Speed settings on CUDA, or with --deterministic the settings that make CUDA runs repeat bit for bit.

    Called before the first CUDA kernel: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle.
    """
    # Process-wide settings: set either way, so none is left over from an earlier run in this process.
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.deterministic = cfg.deterministic
    # Fixed input sizes: cuDNN's autotuned kernels pay off after the first step; autotuning may pick
    # a different (non-deterministic) kernel on each run, so --deterministic turns it off.
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic
    if cfg.deterministic:
        # cuBLAS is only deterministic with a fixed workspace (CUDA docs, "Results reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        log.info("deterministic: deterministic algorithms on, cuDNN autotuning off, CUBLAS_WORKSPACE_CONFIG=%s",
                 os.environ["CUBLAS_WORKSPACE_CONFIG"])
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~10 bits of mantissa, ample for training
        log.info("CUDA: cudnn.benchmark=%s, float32 matmul precision %s", torch.backends.cudnn.benchmark,
                 torch.get_float32_matmul_precision())


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE).

    NCCL with one GPU per local rank on CUDA, Gloo on CPU; a plain `python` launch is rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    configure_backends(cfg, device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    device = use_device(str(device))
    if world_size == 1:
        return 0, 1, device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world_size, device


def build_run(cfg: Config, run_dir: Path, from_checkpoint: bool = False) -> Run:
    """Data, model, loss, optimizer, schedule and guard for cfg, on its device (and rank, under torchrun);
    from_checkpoint as for build_model."""
    rank, world_size, device = setup_distributed(cfg)
    # auto settings are resolved once, here: everything downstream (and every checkpoint) sees the result
    auto_settings = tuple(key for key in MACHINE_SETTINGS if getattr(cfg, key) == "auto")
    if cfg.amp == "auto":
        cfg.amp, why = resolve_amp(cfg.amp, device)
        log.info("amp auto -> %s (%s)", cfg.amp, why)
    if cfg.channels_last == "auto":
        cfg.channels_last, why = resolve_channels_last(cfg.amp, device)
        log.info("channels_last auto -> %s (%s)", cfg.channels_last, why)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    if cfg.download and world_size > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 downloads first (below); the others then read its files
    train_ds, val_ds = build_datasets(cfg)
    if cfg.download and world_size > 1 and rank == 0:
        torch.distributed.barrier()
    resolve_data_settings(cfg, train_ds)
    baselines = data_baselines(cfg, train_ds, val_ds)
    if rank == 0:
        report_data(cfg, train_ds, val_ds, run_dir, baselines)
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds, device, rank, world_size)
    model = build_model(cfg, from_checkpoint).to(device)
    if cfg.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    guard = StepGuard(model, cfg, device)
    if world_size > 1:
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            guard = StepGuard(model, cfg, device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    seed_everything(cfg.seed + rank)  # different augmentation and dropout draws on each rank
    optimizer = build_optimizer(cfg, unwrap(model))
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = WeightEMA(unwrap(model), cfg.ema_decay, own_buffers=cfg.bn_recalibrate > 0) if cfg.ema_decay > 0 else None
    compile_asked = cfg.compile
    if cfg.compile == "auto":
        cfg.compile, why = resolve_compile(device, cfg.epochs * steps_per_epoch)
        log.info("compile auto -> %s (%s)", cfg.compile, why)
    if cfg.compile == "on":  # the first step compiles (first_compiled_step: timed, logged, falls back under auto)
        compile_in_place([unwrap(model), ema.module if ema is not None else None])
    return Run(cfg=cfg, model=model, loss_fn=build_loss(cfg).to(device), optimizer=optimizer, scheduler=scheduler,
               guard=guard, device=device, train_loader=train_loader, val_loader=val_loader, run_dir=run_dir,
               steps_per_epoch=steps_per_epoch, scaler=build_scaler(cfg, device), rank=rank, world_size=world_size,
               baselines=baselines, ema=ema, auto_settings=auto_settings,
               compile_pending=compile_asked if cfg.compile == "on" else None,
               eval_compile_pending=compile_asked if cfg.compile == "on" else None)


def resumed_config(cfg: Config, payload: dict[str, Any], argv: list[str] | None) -> Config:
    """A resumed run goes on with the settings it was trained with: the checkpoint's (checkpoint_settings, as for
    --eval-only). Logs the ones that differ from what this command alone would use (a default changed since, or
    a flag left out)."""
    # A checkpoint from before the auto_settings record: its amp, channels_last and compile are resolved again, as
    # every resume did then (--eval-only of it keeps what they became, as it did).
    payload = {**payload, "auto_settings": payload.get("auto_settings", list(MACHINE_SETTINGS))}
    merged = checkpoint_settings(cfg, payload, argv)
    taken = {k: v for k, v in merged.to_dict().items() if v != getattr(cfg, k)}
    if taken:  # a setting not given here has its config.py default in cfg
        log.info("resume: settings this command does not give are the checkpoint's; these differ from config.py: "
                 "%s (give one again to change it)", ", ".join(f"{k}={v!r} (default {getattr(cfg, k)!r})"
                                                              for k, v in taken.items()))
    return merged


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """--resume PATH, or --resume auto: this run folder's last.pt if there is one (else start fresh)."""
    if cfg.resume != "auto":
        return Path(cfg.resume) if cfg.resume else None
    last = run_dir / "last.pt"
    if last.is_file():
        return last
    log.info("--resume auto: no %s yet, starting from scratch", last)
    return None


def install_stop_handlers(run: Run) -> dict[int, Any]:
    """SIGTERM/SIGINT: finish the current step, save last.pt, exit. A second SIGINT interrupts at once
    (main() exits 130), except during a checkpoint write, which finishes first (signals_deferred)."""

    def request_stop(signum: int, frame: Any) -> None:
        if run.stop_signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping; the first signal decides the exit code
        run.stop_signal = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving last.pt", run.stop_signal)

    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def _start(cfg: Config, argv: list[str] | None) -> tuple[Run, list[logging.Handler]]:
    """Run folder, logging and the Run, resumed if asked. A start-up error removes a run folder it created."""
    world_size, is_main = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")) == 0
    if world_size > 1 and not cfg.out_dir:
        raise ConfigError("out_dir: under torchrun pass --out-dir, so that every rank uses the same run folder")
    resolve_device(cfg.device)  # a bad --device stops here, before any folder is made
    run_dir = Path(cfg.out_dir or time.strftime("runs/%Y%m%d-%H%M%S"))
    cfg.out_dir = str(run_dir)
    created = is_main and not run_dir.exists()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    handlers = setup_logging(run_dir if is_main else None, quiet=not is_main)
    try:
        return _build_and_resume(cfg, run_dir, is_main, argv), handlers
    except (ConfigError, DataError, CheckpointError):
        if created:  # nothing trained: leave no half-made run folder behind
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            handlers.clear()
        raise


def _build_and_resume(cfg: Config, run_dir: Path, is_main: bool, argv: list[str] | None) -> Run:
    checkpoint = resume_path(cfg, run_dir)
    if checkpoint is not None and not checkpoint.is_file():  # before the data scan, which can take minutes
        raise CheckpointError(f"resume: checkpoint {checkpoint} does not exist")
    payload, given = None, None  # given: the keys this command sets (a resume's warnings are about those only)
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        given = given_settings(sys.argv[1:] if argv is None else list(argv))
        cfg = resumed_config(cfg, payload, argv)
        check_fits(checkpoint, payload, cfg)
        saved_optimizer = payload["config"]["optimizer"]
        if saved_optimizer != cfg.optimizer:  # its moments are another optimizer's
            raise CheckpointError(f"checkpoint {checkpoint} was trained with optimizer={saved_optimizer!r}, but the "
                                  f"current config has optimizer={cfg.optimizer!r}: its state cannot continue in "
                                  f"another optimizer; leave --optimizer out to resume, or start a new run")
    elif cfg.resume:
        validate(cfg)  # --resume auto with nothing to resume yet: this command's settings alone (load_config waited)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and cfg.sync_bn and not str(cfg.device).startswith(("cuda", "auto")):
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA; drop --sync-bn on CPU")
    if cfg.warmup_epochs >= cfg.epochs:
        log.info("warmup_epochs %g >= epochs %d: warm-up shortened to %g epochs (half the run)", cfg.warmup_epochs,
                 cfg.epochs, effective_warmup_epochs(cfg))
    if is_main:
        saved = {k: v for k, v in cfg.to_dict().items() if k not in INVOCATION_ONLY}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        changed = {k: v for k, v in saved.items() if v != defaults().get(k)}
        log.info("settings that differ from config.py (all of them: %s): %s", run_dir / "config.yaml",
                 ", ".join(f"{k}={v}" for k, v in changed.items()) or "none")
        for warning in unused_settings(cfg, given):
            log.warning("%s", warning)
    run = build_run(cfg, run_dir, from_checkpoint=checkpoint is not None)
    if checkpoint is not None:
        resume(run, payload)
        log.info("resumed from %s: epoch %d, batch %d of %d, step %d, %d rollbacks, LR scale %g", checkpoint,
                 run.state.epoch + 1, run.state.batch, run.steps_per_epoch, run.state.step, run.state.rollbacks,
                 run.state.lr_scale)
        if run.state.epoch >= cfg.epochs or run.state.early_stop:
            log.warning("the run in %s already finished at epoch %d%s: nothing to train. To train further, resume with "
                        "--epochs M for some M > %d%s", checkpoint, run.state.epoch,
                        f" (early stop: {run.state.early_stop})" if run.state.early_stop else "", run.state.epoch,
                        " and a larger --patience" if run.state.early_stop else "")
    params = sum(p.numel() for p in run.model.parameters())
    log.info("device %s | %s backbone | %.2fM parameters | %d train / %d val images | %d steps per epoch",
             run.device, cfg.backbone, params / 1e6, len(run.train_loader.dataset),
             len(run.val_loader.dataset.dataset), run.steps_per_epoch)
    log.info("global batch %d = batch_size %d x %d process(es); peak LR %g (base_lr %g, scale_lr %s)",
             cfg.batch_size * run.world_size, cfg.batch_size, run.world_size, peak_lr(cfg), cfg.base_lr, cfg.scale_lr)
    return run


def end_run(run: Run, outcome: str, reason: str, code: int,
            verdicts: dict[str, HeadVerdict] | None = None, failure: str | None = None) -> int:
    """Write the run's last record, the `end` event of steps.jsonl, and return the exit code.

    outcome: finished | early_stop (both judged by the verdict) | failed | stopped. failure, for a failed
    run: training (the guard's limits, a checkpoint that could not be written) | input (settings or data,
    exit 2) | out_of_memory | crash (an unforeseen error).
    """
    state = run.state
    record = {"event": "end", "outcome": outcome, "reason": reason, "exit_code": code, "failure": failure,
              "learned": None if not verdicts else all(v.verdict in ("learned", "not trained")
                                                       for v in verdicts.values()),
              "verdict": {head: asdict(v) for head, v in (verdicts or {}).items()},
              "epochs_done": len(state.history), "step": state.step, "steps_per_epoch": run.steps_per_epoch,
              "final": state.history[-1] if state.history else {},
              "best": {"val_miou": state.best_miou, "epoch": state.best_epoch},
              "baselines": asdict(run.baselines) if run.baselines else {},
              "skipped": state.skipped, "fp16_overflows": state.fp16_overflows, "rollbacks": state.rollbacks}
    _append_jsonl(run, [record])
    return code


def conclude(run: Run) -> int:
    """The verdict of a run that ran out of epochs (or stopped early): learned (0) or not (1), said loudly."""
    cfg, state = run.cfg, run.state
    verdicts = judge_learning(state.history, run.baselines, cfg)
    failed = [v for v in verdicts.values() if v.verdict in ("did not learn", "memorising")]
    skipped = sum(state.skipped.values())
    overflows = f"; {state.fp16_overflows} fp16 overflows (GradScaler calibration)" if state.fp16_overflows else ""
    summary = (f"best val mIoU {state.best_miou:.4f} at epoch {state.best_epoch}; {skipped} skipped steps"
               f"{f' {state.skipped}' if skipped else ''}{overflows}; {state.rollbacks} rollbacks; "
               f"run folder {run.run_dir}")
    outcome = "early_stop" if state.early_stop else "finished"
    if not verdicts:
        log.warning("done: no epoch row to judge (the checkpoint predates the verdict): %s", summary)
        return end_run(run, outcome, "no epoch to judge", 0)
    # Every rank reaches the same verdict from the same all-reduced rows; ranks > 0 print errors, so only
    # rank 0 says it (their copies interleaved with rank 0's lines).
    say_error = log.error if run.is_main else log.info
    for verdict in verdicts.values():
        (say_error if verdict in failed else log.info)("verdict: %s", verdict.line())
    if failed:
        reason = "; ".join(f"{v.head} head {v.verdict} ({v.metric} {v.best:.4f}, baseline {v.baseline:.4f})"
                           for v in failed)
        say_error("%s: %s; likely cause: %s. Diagnose: python diagnose_training.py --run %s", "did not learn" if any(
            v.verdict == "did not learn" for v in failed) else "memorising", reason, failed[0].cause, run.run_dir)
        return end_run(run, outcome, reason, 1 if cfg.require_learning else 0, verdicts)
    log.info("done: learned; %s", summary)
    return end_run(run, outcome, "learned", 0, verdicts)


def main(argv: list[str] | None = None) -> int:
    handlers: list[logging.Handler] = []
    previous_handlers: dict[int, Any] = {}
    run: Run | None = None
    try:
        cfg = load_config(argv, prog="train_enhanced_adaptivestream.py", checkpoint_to_come=True)
        if cfg.eval_only or cfg.predict or cfg.export:  # no run folder, no training
            handlers = setup_logging(None, quiet=int(os.environ.get("RANK", "0")) != 0)
            command = evaluate_checkpoint if cfg.eval_only else predict_images if cfg.predict else export_model
            return command(cfg, argv)
        run, handlers = _start(cfg, argv)
        previous_handlers = install_stop_handlers(run)
        fit(run)
        return conclude(run)
    except (ConfigError, DataError, CheckpointError) as err:
        (log.error if handlers else lambda m, e: print(m % e, file=sys.stderr))("error: %s", err)
        if run is not None:  # raised once training had started (--compile on failing, --tensorboard missing)
            return end_run(run, "failed", f"error: {err}", 2, failure="input")
        return 2
    except TrainingFailed as err:  # every rank fails at the same step with the same message: rank 0 says it
        (log.error if run.is_main else log.info)("training failed: %s", err)
        return end_run(run, "failed", str(err), 1, failure="training")
    except StopRequested as err:
        for sig in previous_handlers:  # last.pt is written: a further Ctrl-C must not cut the exit record short
            signal.signal(sig, signal.SIG_IGN)
        log.warning("stopped by %s at epoch %d, step %d; last.pt is saved. Resume with the same command plus "
                    "--resume %s", err, run.state.epoch + 1, run.state.step, run.run_dir / "last.pt")
        return end_run(run, "stopped", f"{err} at step {run.state.step}", 0 if str(err) == "SIGTERM" else 130)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: an expected way out, no traceback
        for sig in previous_handlers:
            signal.signal(sig, signal.SIG_IGN)
        if run is None:
            (log.warning if handlers else lambda m: print(m, file=sys.stderr))("interrupted (Ctrl-C) before training "
                                                                              "started")
            return 130
        last = run.run_dir / "last.pt"
        log.warning("interrupted by a second Ctrl-C at epoch %d, step %d; %s", run.state.epoch + 1, run.state.step,
                    f"{last} holds the last completed save (a checkpoint write is never cut short). Resume with "
                    f"the same command plus --resume {last}" if last.is_file() else "no checkpoint was saved yet")
        return end_run(run, "stopped", f"second SIGINT at step {run.state.step}", 130)
    except torch.OutOfMemoryError as err:  # the device's memory, not the code: say which settings to lower
        if run is None:
            raise
        what = error_line(err)
        log.error("out of memory in epoch %d after step %d (%s): lower --batch-size (now %d) or --image-size (now "
                  "%d)%s and start again", run.state.epoch + 1, run.state.step, what, run.cfg.batch_size,
                  run.cfg.image_size, ", or train in bf16 (--amp bf16)" if run.cfg.amp == "off" else "")
        return end_run(run, "failed", f"out of memory after step {run.state.step}: {what}", 1, failure="out_of_memory")
    except Exception as err:  # a bug or another unforeseen failure: its traceback is the report, and the run's
        if run is not None:  # record still ends with an end event (diagnose reads it)
            end_run(run, "failed", f"crashed: {error_line(err)}", 1, failure="crash")
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
