"""Benchmark what a user pays for: speed, memory and guard overhead of the real training step.

    python benchmarks/bench_train.py                           # CPU, default model (compiled, as the default run)
    python benchmarks/bench_train.py --peer smp --json bench.json
    python benchmarks/bench_train.py --device cuda --amp bf16 --channels-last on --compile on
    python benchmarks/bench_train.py --time-to-miou 0.85 --peer smp --budget-s 1800
    python benchmarks/bench_train.py --folder-fixture 64       # loader on a written folder dataset

Every flag that is not a benchmark flag below is a training setting and goes to config.py's
load_config (--image-size, --batch-size, --width, --amp, --channels-last, --compile, --device, ...), so the
benchmark measures exactly the configuration a training run would use. It imports the real
build_run / train_step / evaluate / fit and never re-implements them.

Prints JSON to stdout (or --json FILE) and a readable table to stderr. Exit codes: 0 done;
1 the measured run failed (a skipped or non-finite step); 2 bad usage or input.
Interleaving: every timed arm (guarded, unguarded, peer) runs one step in turn, in a rotating
order, on the same batch, so load from other processes hits all arms alike; ratios are medians
of per-round ratios and hold on a busy machine even when absolute images/s drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_enhanced_adaptivestream as T  # noqa: E402
from data import DataError, SyntheticShapes, build_datasets, build_loaders  # noqa: E402
from config import Config, ConfigError, load_config, parser_flags  # noqa: E402

PEER_INSTALL = ("pip install --target /path/to/peer-pkgs --no-deps segmentation-models-pytorch timm "
                "huggingface_hub safetensors httpx2 httpcore2 anyio h11 idna truststore click hf-xet, "
                "then PYTHONPATH=/path/to/peer-pkgs (see benchmarks/README.md)")


class BenchError(RuntimeError):
    """The benchmark cannot measure what was asked; exit code 2."""


class BenchFailed(RuntimeError):
    """A measured run misbehaved (skipped or non-finite step); exit code 1."""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(
        prog="bench_train.py", allow_abbrev=False, description=__doc__.splitlines()[0],
        epilog="Any other flag is a training setting (see: python train_enhanced_adaptivestream.py --help).")
    parser.add_argument("--steps", type=int, default=16, help="timed training steps per arm (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default 2)")
    parser.add_argument("--eval-batches", type=int, default=4, help="batches in the eval timing (default 4)")
    parser.add_argument("--loader-batches", type=int, default=12, help="batches read in a loader timing (default 12)")
    parser.add_argument("--peer", choices=["smp"], help="also time segmentation_models_pytorch Unet('resnet18')")
    parser.add_argument("--folder-fixture", type=int, metavar="N", default=0,
                        help="write N 224x224 JPEG/PNG pairs as a folder dataset and time its loader (2 workers)")
    parser.add_argument("--time-to-miou", type=float, metavar="TARGET", default=0.0,
                        help="train each model with fit() until val mIoU >= TARGET (or --budget-s); off by default")
    parser.add_argument("--budget-s", type=float, help="wall-clock cap per model for --time-to-miou (default: none)")
    parser.add_argument("--json", metavar="FILE", help="write the JSON here instead of stdout")
    args, rest = parser.parse_known_args(argv)
    for name in ("steps", "eval_batches"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.loader_batches < 2:
        raise ConfigError("--loader-batches: need at least 2 (the first batch only measures start-up)")
    if not 0.0 <= args.time_to_miou < 1.0:
        raise ConfigError(f"--time-to-miou: a val mIoU between 0 and 1, got {args.time_to_miou}")
    cfg = load_config(rest, prog="bench_train.py", own_flags=parser_flags(parser))
    if args.peer:
        import_smp()  # fail now, not after minutes of measuring
    return args, cfg


# ---- measurements ----
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_forward_flops(model: nn.Module, cfg: Config, device: torch.device) -> float:
    """Forward FLOPs for one image (torch.utils.flop_counter: 2 per multiply-add), in eval mode."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())


def measure_matmul_gflops(device: torch.device, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate: the compute ceiling a training step is compared with. In fp32
    itself: on CUDA the training set-up allows TF32 matmuls (precision "high"), which would time tensor cores
    at several times the fp32 rate. 4096 on a GPU, so that one product outlasts the sync around it."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for i in range(repeats + 2):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_float32_matmul_precision(precision)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "CPU max RSS of the process"  # KiB on Linux


def make_batches(run: T.Run, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`count` distinct training batches on the device (so the step timing excludes data loading)."""
    dataset, size = run.train_loader.dataset, run.cfg.batch_size
    if len(dataset) < count * size:
        count = max(1, len(dataset) // size)
    return [T.to_device(torch.utils.data.default_collate([dataset[i * size + j] for j in range(size)]), run)
            for i in range(count)]


def time_interleaved(arms: dict[str, T.Run], batches: list, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per train_step for each arm. Round i runs one step of every arm on batch i, in an order
    that rotates each round (A B, B A, ...), so no arm always runs first or after the same neighbour."""
    names = list(arms)
    for arm in arms.values():
        arm.model.train()
    device = next(iter(arms.values())).device
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(warmup + steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            batch = batches[i % len(batches)]
            sync(device)
            start = time.perf_counter()
            outputs[name].append(T.train_step(arms[name], *batch))
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    for name in names:
        check_steps(arms[name], name, torch.stack(outputs[name]).cpu())
    return times


def check_steps(run: T.Run, name: str, stats: torch.Tensor) -> None:
    """Timings of skipped or non-finite steps measure nothing: fail loudly instead of reporting them.
    An fp16 overflow is GradScaler finding its scale, part of a normal fp16 run, and does not count."""
    losses, reasons = stats[:, 0], stats[:, 4]
    codes = [T._skip_name(run, int(r)) for r in reasons if r != 0]
    codes = [code for code in codes if code != "fp16 overflow"]
    if codes or not torch.isfinite(losses[reasons == 0]).all():
        raise BenchFailed(f"{name}: {len(codes)} skipped steps ({', '.join(sorted(set(codes)))}) or non-finite "
                          f"losses {losses.tolist()}: the timings would not be of real training steps "
                          f"(a model whose normal gradient norm is above --skip-grad-norm skips every step)")


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: the steps of one round ran back to back under the same load."""
    return statistics.median(x / y for x, y in zip(a, b))


def ratio_quartiles(a: list[float], b: list[float]) -> list[float]:
    """First and third quartile of the per-round ratios a[i] / b[i]: the noise the median sits in."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [q1, q3]


def time_guard_alone(run: T.Run, batch: tuple, repeats: int = 50) -> float:
    """Seconds of the guard's own work per step (stash BN buffers, decide, commit), measured directly.

    A fresh StepGuard on the same model: its commit writes the buffers back unchanged (accept),
    and the run's own guard state is not touched. Complements the A/B ratio, whose noise on a busy
    machine is larger than the guard's cost.
    """
    guard = T.StepGuard(run.model, run.cfg, run.device)
    loss = torch.tensor(1.0, device=run.device)
    grad_norm = torch.tensor(1.0, device=run.device)
    times = []
    for _ in range(repeats):
        sync(run.device)
        start = time.perf_counter()
        guard.stash_buffers()
        reason = guard.reason(loss, grad_norm)
        guard.commit(reason != 0, loss, grad_norm)
        sync(run.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_snapshot(run: T.Run, repeats: int = 5) -> float:
    """Median seconds of one rollback snapshot (T.take_snapshot: weights, optimizer, schedule, RNG to CPU)."""
    times = []
    for _ in range(repeats):
        sync(run.device)
        start = time.perf_counter()
        T.take_snapshot(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_eval(run: T.Run, batches: list, repeats: int = 2) -> float:
    """Eval images/s of the real evaluate() on device-resident batches (no data loading), best of repeats."""
    data = [{"image": images, "mask": masks, "label": labels} for images, masks, labels in batches]
    images = sum(b[0].shape[0] for b in batches)
    T.evaluate(run.model, data[:1], run.loss_fn, run.cfg, run.device, run.autocast)  # warm-up
    best = math.inf
    for _ in range(repeats):
        sync(run.device)
        start = time.perf_counter()
        T.evaluate(run.model, data, run.loss_fn, run.cfg, run.device, run.autocast)
        sync(run.device)
        best = min(best, time.perf_counter() - start)
    run.model.train()
    return images / best


def time_loader(cfg: Config, device: torch.device, batches: int) -> dict[str, float]:
    """images/s of a fresh training loader from build_datasets + build_loaders (first epoch: nothing cached).

    The first batch includes worker start-up and is reported apart; the rate is over the rest.
    """
    train_ds, val_ds = build_datasets(cfg)
    loader, _ = build_loaders(cfg, train_ds, val_ds, device)
    batches = min(batches, len(loader))
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_s = time.perf_counter() - start
    start, images = time.perf_counter(), 0
    for _ in range(batches - 1):
        images += next(iterator)["image"].shape[0]
    rate = images / (time.perf_counter() - start)
    del iterator, first
    return {"images_per_s": rate, "first_batch_s": first_s, "num_workers": cfg.num_workers,
            "batches": batches}


# ---- models and arms ----
def import_smp() -> Any:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:
        raise BenchError(f"--peer smp needs segmentation_models_pytorch ({err}); install it outside the "
                         f"project: {PEER_INSTALL}") from None
    return smp


class PeerUnet(nn.Module):
    """segmentation_models_pytorch's Unet('resnet18') with a classification head, returning
    (seg_logits [B, S, H, W], cls_logits [B, C]) like AdaptiveStream, so the real train_step runs it."""

    def __init__(self, num_seg_classes: int, num_cls_classes: int):
        super().__init__()
        self.net = import_smp().Unet("resnet18", encoder_weights=None, classes=num_seg_classes,
                            aux_params={"classes": num_cls_classes})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, cls = self.net(x)
        return seg, cls


def run_with_model(base: T.Run, model: nn.Module, guarded: bool) -> T.Run:
    """A Run like base (data, loss, config) around another model, with its own optimizer, schedule and guard.

    The unguarded arm is its own Run, never base with guard set to None: the guarded step leaves its
    verdict on the optimizer (found_inf), and a later unguarded step on that optimizer would reuse it.
    """
    cfg, device = base.cfg, base.device
    model = model.to(device)
    if cfg.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    optimizer = T.build_optimizer(cfg, model)
    ema = T.WeightEMA(model, cfg.ema_decay, own_buffers=cfg.bn_recalibrate > 0) if cfg.ema_decay > 0 else None
    if cfg.compile == "on":  # as build_run compiles a training run's model (the first step compiles it)
        T.compile_in_place([model, ema.module if ema is not None else None])
    return dataclasses.replace(
        base, model=model, optimizer=optimizer, state=T.TrainState(),
        scheduler=T.build_scheduler(cfg, optimizer, len(base.train_loader)),
        guard=T.StepGuard(model, cfg, device) if guarded else None,
        scaler=T.build_scaler(cfg, device), ema=ema, compile_pending=cfg.compile if cfg.compile == "on" else None)


def build_peer(cfg: Config) -> nn.Module:
    if cfg.image_size % 32:
        raise ConfigError(f"image_size: the smp U-Net needs a multiple of 32, got {cfg.image_size}")
    return PeerUnet(cfg.num_seg_classes, cfg.num_cls_classes)


def describe_model(model: nn.Module, cfg: Config, device: torch.device) -> dict[str, float]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "gflops_per_image": count_forward_flops(model, cfg, device) / 1e9}


def compile_arms(arms: dict[str, T.Run], batch: tuple) -> None:
    """Run each compiled arm's first step now, which compiles it (outside the timed steps); compile errors
    stop with a message instead of a compiler trace."""
    for name, arm in arms.items():
        arm.compile_pending = None
        try:
            T.train_step(arm, *batch)  # compiles now, outside the timed steps
        except Exception as err:  # inductor raises many types; the chained traceback keeps the real cause
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise BenchError(f"--compile: the first compiled step of {name} failed ({type(err).__name__}: "
                             f"{first_line}); run with --compile off") from err


# ---- folder fixture ----
def write_folder_fixture(root: Path, count: int, cfg: Config, size: int = 224) -> None:
    """The folder dataset's layout, filled with synthetic-task samples: root/images/<stem>.jpg,
    root/masks/<stem>.png (one class index per pixel) and root/labels.csv (filename,label)."""
    from PIL import Image

    shapes = SyntheticShapes(count, size, cfg.num_seg_classes, cfg.num_cls_classes, cfg.seed, "train")
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["filename,label"]
    for i in range(count):
        image, mask, label = shapes.sample(i)  # uint8 [3, H, W], uint8 [H, W], int
        stem = f"sample{i:05d}"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "images" / f"{stem}.jpg", quality=90)
        Image.fromarray(mask.numpy()).save(root / "masks" / f"{stem}.png")
        rows.append(f"{stem}.jpg,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def prepare_folder_fixture(root: Path, cfg: Config, count: int) -> Config:
    """Write the fixture into root and return its config (2 workers); BenchError if the folder dataset
    rejects it. Runs before anything is timed, so a bad fixture fails in seconds, not after the benchmark.
    """
    if count < 2 * cfg.batch_size:
        raise ConfigError(f"--folder-fixture: need at least 2 batches of images ({2 * cfg.batch_size}), got {count}")
    write_folder_fixture(root, count, cfg)
    folder_cfg = Config(**{**cfg.to_dict(), "dataset": "folder", "data_root": str(root), "num_workers": 2})
    try:
        build_datasets(folder_cfg)
    except DataError as err:
        raise BenchError(f"--folder-fixture: the folder dataset rejected the fixture written to {root}: "
                         f"{err}") from None
    return folder_cfg


# ---- time to mIoU ----
def train_side_by_side(cfg: Config, makers: dict[str, Callable[[], nn.Module] | None], targets: dict[str, float],
                       budget_s: float | None, stop_at_targets: bool = True,
                       epochs: dict[str, int] | None = None) -> dict[str, Any]:
    """Train each model with the real fit(), taking turns one epoch at a time; per model, the epochs and
    wall-clock seconds until each val metric of `targets` (val_miou, val_cls_acc) first reached its target.

    Taking turns: drift from other processes hits every model alike. Each model has its own data,
    optimizer and schedule over cfg.epochs (or its entry of `epochs`), and stops at the end of its
    schedule, after budget_s seconds, or (stop_at_targets) once every target is reached. Seconds include
    data loading, evaluation and checkpoints, as a user pays them; epochs to a target do not depend on
    the load.
    """
    curves: dict[str, list[dict[str, float]]] = {}
    stopped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs, planned = {}, {name: (epochs or {}).get(name, cfg.epochs) for name in makers}
        for name, make in makers.items():
            run_cfg = Config(**{**cfg.to_dict(), "out_dir": str(Path(tmp) / name), "epochs": planned[name]})
            Path(run_cfg.out_dir).mkdir()
            base = T.build_run(run_cfg, Path(run_cfg.out_dir))
            runs[name] = base if make is None else run_with_model(base, make(), guarded=True)
            curves[name] = []
        elapsed = dict.fromkeys(runs, 0.0)
        while len(stopped) < len(runs):
            for name in [n for n in runs if n not in stopped]:
                run = runs[name]
                run.cfg.epochs = run.state.epoch + 1  # fit() trains up to cfg.epochs: one more epoch per call
                start = time.perf_counter()
                row = T.fit(run)
                elapsed[name] += time.perf_counter() - start
                point = {"epoch": run.state.epoch, "seconds": round(elapsed[name], 1),
                         **{k: float(row[k]) for k in ("val_miou", "val_cls_acc", "train_cls_acc")}}
                curves[name].append(point)
                print(f"side by side  {name:<8} epoch {point['epoch']:>2}  val mIoU {point['val_miou']:.4f}  "
                      f"cls acc {point['val_cls_acc']:.4f}  after {elapsed[name]:.0f} s", file=sys.stderr)
                if stop_at_targets and all(point[k] >= v for k, v in targets.items()):
                    stopped[name] = "target"
                elif run.state.epoch >= planned[name]:
                    stopped[name] = "schedule"
                elif budget_s is not None and elapsed[name] >= budget_s:
                    stopped[name] = "budget"
        images_per_epoch = len(runs[next(iter(runs))].train_loader) * cfg.batch_size
    models = {}
    for name, curve in curves.items():
        reached = {k: next((p for p in curve if p[k] >= v), None) for k, v in targets.items()}
        models[name] = {
            "schedule_epochs": planned[name], "stopped_by": stopped[name], "seconds_trained": curve[-1]["seconds"],
            "final": curve[-1],
            "best": {k: max(p[k] for p in curve) for k in ("val_miou", "val_cls_acc")},
            "to_target": {k: None if p is None else {"epoch": p["epoch"], "seconds": p["seconds"]}
                          for k, p in reached.items()},
            "curve": curve}
    return {"targets": targets, "budget_s": budget_s, "schedule_epochs": cfg.epochs,
            "images_per_epoch": images_per_epoch, "models": models}


# ---- report ----
def describe_machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def summarize_arm(run: T.Run, info: dict[str, float], times: list[float], matmul_gflops: float) -> dict[str, float]:
    images_per_s = run.cfg.batch_size / statistics.median(times)
    achieved = 3 * info["gflops_per_image"] * images_per_s  # backward ~ 2x forward
    return {**info, "train_images_per_s": images_per_s, "train_step_ms": 1000 * statistics.median(times),
            "achieved_train_gflops": achieved, "fraction_of_matmul": achieved / matmul_gflops}


def measure(args: argparse.Namespace, cfg: Config, argv: list[str]) -> dict[str, Any]:
    """Every figure of the benchmark, as one JSON-ready dict."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder_cfg = None
        if args.folder_fixture:
            folder_cfg = prepare_folder_fixture(Path(tmp) / "folder", cfg, args.folder_fixture)
        cfg.out_dir = str(Path(tmp) / "run")
        Path(cfg.out_dir).mkdir()
        compile_asked, cfg.compile = cfg.compile, "off"  # FLOPs are counted on the eager model; arms compile below
        base = T.build_run(cfg, Path(cfg.out_dir))
        device = base.device
        # As a training run of this configuration would decide (its planned steps, not the benchmark's).
        cfg.compile = (T.resolve_compile(device, cfg.epochs * len(base.train_loader))[0]
                       if compile_asked == "auto" else compile_asked)
        batches = make_batches(base, max(2, args.eval_batches))
        infos = {"guarded": describe_model(base.model, cfg, device)}
        if device.type == "cuda":  # the first step runs cuDNN's autotuning, whose trial workspaces are no step's
            T.train_step(base, *batches[0])
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        T.train_step(base, *batches[0])  # the peak of one guarded step, before any other model is built
        sync(device)
        peak_mb, peak_kind = peak_memory_mb(device)
        unguarded_model = T.build_model(cfg)
        unguarded_model.load_state_dict(base.model.state_dict())  # the same weights as the guarded arm
        arms = {"guarded": base, "unguarded": run_with_model(base, unguarded_model, guarded=False)}
        if args.peer:
            arms["peer"] = run_with_model(base, build_peer(cfg), guarded=True)
            infos["peer"] = describe_model(arms["peer"].model, cfg, device)
        if cfg.compile == "on":
            T.compile_in_place([T.unwrap(base.model)])  # built eagerly above, for the FLOP count and the peak memory
            compile_arms(arms, batches[0])
        times = time_interleaved(arms, batches, args.steps, args.warmup)
        matmul = measure_matmul_gflops(device)
        guard_s = time_guard_alone(base, batches[0])
        snapshot_s = time_snapshot(base)
        ours = summarize_arm(base, infos["guarded"], times["guarded"], matmul)
        ours.update(peak_memory_mb=peak_mb,
                    unguarded_images_per_s=cfg.batch_size / statistics.median(times["unguarded"]),
                    guard_ratio=median_ratio(times["guarded"], times["unguarded"]),
                    guard_ratio_quartiles=ratio_quartiles(times["guarded"], times["unguarded"]),
                    guard_alone_ms=1000 * guard_s, guard_alone_fraction=guard_s / statistics.median(times["guarded"]),
                    snapshot_ms=1000 * snapshot_s,
                    snapshot_fraction=snapshot_s / cfg.snapshot_every / statistics.median(times["guarded"]),
                    eval_images_per_s=time_eval(base, batches[:args.eval_batches]))
        result: dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/bench_train.py", *argv]),
            "machine": describe_machine(device),
            "settings": {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "amp": cfg.amp,
                         "channels_last": cfg.channels_last, "compile": cfg.compile, "backbone": cfg.backbone,
                         "width": cfg.width, "stem_kernel": cfg.stem_kernel, "stream_channels": cfg.stream_channels,
                         "decoder_channels": cfg.decoder_channels, "snapshot_every": cfg.snapshot_every,
                         "steps": args.steps, "warmup": args.warmup},
            "matmul_gflops": matmul, "peak_memory_kind": peak_kind, "ours": ours}
        if args.peer:
            peer = summarize_arm(arms["peer"], infos["peer"], times["peer"], matmul)
            # > 1: ours trains more images per second than the peer, measured round by round.
            peer["ours_speedup"] = median_ratio(times["peer"], times["guarded"])
            peer["eval_images_per_s"] = time_eval(arms["peer"], batches[:args.eval_batches])
            result["peer"] = {"name": "smp.Unet('resnet18', encoder_weights=None) + aux classifier", **peer}
        del arms, base, batches
        result["loader"] = {"dataset": cfg.dataset, **time_loader(cfg, device, args.loader_batches)}
        if folder_cfg is not None:
            result["folder_loader"] = {"images": args.folder_fixture,
                                       **time_loader(folder_cfg, device, args.loader_batches)}
    if args.time_to_miou:
        makers: dict[str, Callable[[], nn.Module] | None] = {"ours": None}
        if args.peer:
            makers["peer"] = lambda: build_peer(cfg)
        ttm = result["time_to_miou"] = train_side_by_side(cfg, makers, {"val_miou": args.time_to_miou}, args.budget_s)
        # Epochs to the target (load-independent) x training seconds per epoch at the interleaved rates.
        for name, model in ttm["models"].items():
            reached = model["to_target"]["val_miou"]
            if reached is not None:
                model["train_s_to_target_at_interleaved_rate"] = (
                    reached["epoch"] * ttm["images_per_epoch"] / result[name]["train_images_per_s"])
    result["seconds"] = time.perf_counter() - started
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as aligned text lines: metric, ours, peer (when measured)."""
    s, ours, peer = result["settings"], result["ours"], result.get("peer", {})
    head = (f"{s['backbone']} on {result['machine']['device']} ({result['machine']['cpu']}, "
            f"{result['machine']['torch_threads']} threads), {s['image_size']}x{s['image_size']}, batch "
            f"{s['batch_size']}, amp {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}")
    rows = [("", "ours", "smp U-Net R18" if peer else ""),
            ("parameters (M)", ours["params"] / 1e6, peer.get("params", 0) / 1e6 if peer else None),
            ("forward GFLOPs / image", ours["gflops_per_image"], peer.get("gflops_per_image")),
            (f"peak memory (MB, {result['peak_memory_kind']})", ours["peak_memory_mb"], None),
            (f"train images/s (guarded, median of {s['steps']})", ours["train_images_per_s"],
             peer.get("train_images_per_s")),
            ("train images/s (unguarded)", ours["unguarded_images_per_s"], None),
            ("guard ratio: guarded / unguarded step time", ours["guard_ratio"], None),
            ("  per-round quartiles of that ratio", "{:.3f}-{:.3f}".format(*ours["guard_ratio_quartiles"]), None),
            ("guard alone: ms per step", ours["guard_alone_ms"], None),
            ("guard alone: fraction of a step", ours["guard_alone_fraction"], None),
            ("rollback snapshot: ms each", ours["snapshot_ms"], None),
            (f"snapshot cost per step (every {result['settings'].get('snapshot_every', '?')} steps)",
             ours["snapshot_fraction"], None),
            ("achieved train GFLOP/s (3 x fwd x img/s)", ours["achieved_train_gflops"],
             peer.get("achieved_train_gflops")),
            ("fp32 matmul GFLOP/s (this machine, now)", result["matmul_gflops"], None),
            ("eval images/s", ours["eval_images_per_s"], peer.get("eval_images_per_s")),
            (f"loader images/s ({result['loader']['dataset']}, {result['loader']['num_workers']} workers)",
             result["loader"]["images_per_s"], None)]
    if "folder_loader" in result:
        rows.append(("loader images/s (folder fixture, 2 workers)", result["folder_loader"]["images_per_s"], None))
    if peer:
        rows.append(("ours / peer train images/s (per-round median)", peer["ours_speedup"], None))
    lines = [head]
    for label, a, b in rows:
        cells = [c if isinstance(c, str) else ("" if c is None else f"{c:.4g}") for c in (a, b)]
        lines.append(f"  {label:<50} {cells[0]:>10} {cells[1]:>14}")
    if "time_to_miou" in result:
        ttm = result["time_to_miou"]
        for name, model in ttm["models"].items():
            hit = model["to_target"]["val_miou"]
            if hit is None:
                reached = f"not reached ({model['stopped_by']})"
            else:
                reached = (f"epoch {hit['epoch']}, {hit['seconds']:.0f} s wall, "
                           f"{model['train_s_to_target_at_interleaved_rate']:.0f} s at the interleaved rate")
            lines.append(f"  val mIoU {ttm['targets']['val_miou']:.2f}, {name}: {reached}; "
                         f"best {model['best']['val_miou']:.4f}")
    lines.append(f"  ({result['seconds']:.0f} s in all)")
    return "\n".join(lines)


def run_measurement(measure: Callable[[], Any]) -> tuple[int, Any]:
    """(0, measure()) or, with the error printed, (2, None) for bad usage or input and (1, None) for a
    measurement that failed: the exit codes of every benchmark script."""
    try:
        return 0, measure()
    except (ConfigError, DataError, BenchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2, None
    except BenchFailed as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse_and_measure() -> tuple[argparse.Namespace, dict[str, Any]]:
        args, cfg = parse_args(argv)
        return args, measure(args, cfg, argv)

    code, measured = run_measurement(parse_and_measure)
    if code:
        return code
    args, result = measured
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2, allow_nan=False)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
