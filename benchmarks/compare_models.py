"""Compare models side by side on one dataset: size, speed in fp32 and bf16, and a full training run each.

    python benchmarks/compare_models.py --models adaptivestream,resnet18 --epochs 2        # minutes
    PYTHONPATH=.peer python benchmarks/compare_models.py --models adaptivestream,resnet18,smp \\
        --dataset folder --data-root /tmp/digits --num-seg-classes 2 --num-cls-classes 10 --image-size 96 \\
        --vis-every 0 --target-miou 0.94 --target-cls-acc 0.85 --json digits.json

Models: any BACKBONE of config.py (the AdaptiveStream decoder and heads around that encoder) and `smp`
(segmentation_models_pytorch's Unet('resnet18') with its aux classifier, installed outside the project:
benchmarks/README.md). Every other flag is a training setting (config.py), shared by all models.

Per model, in one process: parameters, forward GFLOPs per image (torch.utils.flop_counter), train and eval
images/s for each --precisions entry (the real guarded train_step and evaluate(), every arm one step in
turn on the same device-resident batches, so load from other processes hits all alike), then a full
training run with the real fit() (models take turns one epoch at a time): final and best val mIoU and
classification accuracy, and the epoch and wall-clock seconds at which each target was first reached.
Prints a Markdown table (stdout) and writes --json. Exit codes: 0 done; 1 a measured step failed; 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_enhanced_adaptivestream as T  # noqa: E402
import bench_train as B  # noqa: E402
from config import _CHOICES, Config, ConfigError, load_config, parser_flags  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog="compare_models.py", allow_abbrev=False,
                                     description=__doc__.splitlines()[0],
                                     epilog="Any other flag is a training setting shared by every model.")
    parser.add_argument("--models", default="adaptivestream,resnet18",
                        help="comma-separated: backbones of config.py and/or smp, each optionally with :EPOCHS, its "
                             "own schedule length (default adaptivestream,resnet18: --epochs each)")
    parser.add_argument("--precisions", default="off,bf16",
                        help="AMP settings to time, comma-separated (default off,bf16)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per arm (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default 2)")
    parser.add_argument("--eval-batches", type=int, default=4, help="batches in the eval timing (default 4)")
    parser.add_argument("--target-miou", type=float, default=0.9, help="val mIoU target (default 0.9)")
    parser.add_argument("--target-cls-acc", type=float, default=0.9, help="val cls accuracy target (default 0.9)")
    parser.add_argument("--no-train", action="store_true", help="size and speed only, no training runs")
    parser.add_argument("--budget-s", type=float, help="wall-clock cap per model's training (default: none)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(rest, prog="compare_models.py", own_flags=parser_flags(parser))
    backbones = _CHOICES["BACKBONE"]
    args.epochs = {}
    models = []
    for entry in (m.strip() for m in args.models.split(",") if m.strip()):
        name, _, epochs = entry.partition(":")
        if epochs:
            if not epochs.isdigit() or int(epochs) < 1:
                raise ConfigError(f"--models: {entry!r}: the epochs after ':' must be a whole number >= 1")
            args.epochs[name] = int(epochs)
        models.append(name)
    args.models = models
    for name in args.models:
        if name != "smp" and name not in backbones:
            raise ConfigError(f"--models: {name!r} is neither smp nor a backbone ({', '.join(backbones)})")
    if len(set(args.models)) != len(args.models) or not args.models:
        raise ConfigError(f"--models: name each model once, got {','.join(args.models) or 'none'}")
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for precision in args.precisions:
        if precision not in T.AMP_DTYPES:
            raise ConfigError(f"--precisions: {precision!r} is not one of {', '.join(T.AMP_DTYPES)}")
    if args.steps < 1 or args.warmup < 0 or args.eval_batches < 1:
        raise ConfigError("--steps and --eval-batches must be >= 1, --warmup >= 0")
    if "smp" in args.models:
        B.import_smp()  # fail now, not after minutes of measuring
    return args, cfg


def model_maker(name: str, cfg: Config) -> Callable[[], nn.Module]:
    if name == "smp":
        return lambda: B.build_peer(cfg)
    return lambda: T.build_model(Config(**{**cfg.to_dict(), "backbone": name}))


def measure_speed(args: argparse.Namespace, cfg: Config, makers: dict[str, Callable[[], nn.Module]]) -> dict[str, Any]:
    """Parameters, GFLOPs, and train/eval images/s of every model at every precision, interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = Config(**{**cfg.to_dict(), "out_dir": tmp, "compile": "off"})  # compiled below, all alike
        base = T.build_run(run_cfg, Path(tmp))
        compile_on = cfg.compile == "on" or (
            cfg.compile == "auto" and T.resolve_compile(base.device, cfg.epochs * base.steps_per_epoch)[0] == "on")
        batches = B.make_batches(base, max(2, args.eval_batches))
        sizes, arms = {}, {}
        for name, make in makers.items():
            torch.manual_seed(cfg.seed)
            model = make()
            sizes[name] = B.describe_model(model.to(base.device), run_cfg, base.device)
            for precision in args.precisions:
                arm_cfg = Config(**{**base.cfg.to_dict(), "amp": precision, "compile": "on" if compile_on else "off"})
                copy = make()
                copy.load_state_dict(model.state_dict())
                arms[(name, precision)] = B.run_with_model(dataclasses.replace(base, cfg=arm_cfg), copy, guarded=True)
        labels = {key: f"{key[0]}/{key[1]}" for key in arms}
        timed = {labels[key]: arm for key, arm in arms.items()}
        if compile_on:
            B.compile_arms(timed, batches[0])
        times = B.time_interleaved(timed, batches, args.steps, args.warmup)
        speed = {}
        for (name, precision), arm in arms.items():
            speed.setdefault(name, {})[precision] = {
                "train_images_per_s": cfg.batch_size / statistics.median(times[labels[(name, precision)]]),
                "eval_images_per_s": B.time_eval(arm, batches[:args.eval_batches])}
    return {"compile": compile_on, "sizes": sizes, "speed": speed,
            "resolved": {k: getattr(base.cfg, k) for k in ("amp", "channels_last")}}


def markdown(result: dict[str, Any]) -> str:
    precisions, s = result["precisions"], result["settings"]
    targets = result.get("training", {}).get("targets", {})
    head = ["model", "params (M)", "GFLOPs / image"]
    for p in precisions:
        name = "fp32" if p == "off" else p
        head += [f"train img/s {name}", f"eval img/s {name}"]
    if targets:
        head += ["epochs", f"val mIoU {targets['val_miou']:.2f} at", f"val cls acc {targets['val_cls_acc']:.2f} at",
                 "final val mIoU", "final val cls acc", "best cls acc", "training time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name in result["models"]:
        size, speed = result["sizes"][name], result["speed"][name]
        row = [name, f"{size['params'] / 1e6:.2f}", f"{size['gflops_per_image']:.2f}"]
        for p in precisions:
            row += [f"{speed[p]['train_images_per_s']:.1f}", f"{speed[p]['eval_images_per_s']:.1f}"]
        if targets:
            trained = result["training"]["models"][name]

            def at(hit: dict[str, float] | None) -> str:
                return "not reached" if hit is None else f"epoch {hit['epoch']}, {hit['seconds']:.0f} s"

            row += [str(trained["schedule_epochs"]), at(trained["to_target"]["val_miou"]),
                    at(trained["to_target"]["val_cls_acc"]),
                    f"{trained['final']['val_miou']:.3f}", f"{trained['final']['val_cls_acc']:.3f}",
                    f"{trained['best']['val_cls_acc']:.3f}", f"{trained['seconds_trained']:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    machine = result["machine"]
    lines.append("")
    lines.append(f"{s['dataset']} {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, "
                 f"training amp {s['amp']}, channels_last {s['channels_last']}, "
                 f"compile {'on' if result['compile'] else 'off'}; "
                 f"{machine['cpu']}, {machine['torch_threads']} threads, {machine['device']}; "
                 f"{result['seconds']:.0f} s "
                 f"in all. `{result['command']}`")
    return "\n".join(lines)


def compare(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Every figure of the comparison, as one JSON-ready dict."""
    started = time.perf_counter()
    args, cfg = parse_args(argv)
    makers = {name: model_maker(name, cfg) for name in args.models}
    result: dict[str, Any] = {"command": " ".join(["python", "benchmarks/compare_models.py", *argv]),
                              "models": args.models, "precisions": args.precisions}
    result.update(measure_speed(args, cfg, makers))
    result["machine"] = B.describe_machine(T.resolve_device(cfg.device))
    if not args.no_train:
        train_cfg = Config(**{**cfg.to_dict(), "compile": "on" if result["compile"] else "off"})
        first = args.models[0]
        train_makers = {name: (None if name == first and name != "smp" else make) for name, make in makers.items()}
        if first != "smp":
            train_cfg.backbone = first
        result["training"] = B.train_side_by_side(
            train_cfg, train_makers, {"val_miou": args.target_miou, "val_cls_acc": args.target_cls_acc},
            args.budget_s, stop_at_targets=False, epochs=args.epochs)
        cfg = train_cfg
    result["settings"] = {**{k: getattr(cfg, k) for k in ("dataset", "image_size", "batch_size", "seed")},
                          **result["resolved"]}
    result["seconds"] = time.perf_counter() - started
    return args, result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code, measured = B.run_measurement(lambda: compare(argv))
    if code:
        return code
    args, result = measured
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
