"""What the speed settings buy on this machine: channels-last and torch.compile, alone and together.

    python benchmarks/speed_settings.py                                   # default model, 224 px, CPU
    python benchmarks/speed_settings.py --arms eager,channels_last --image-size 96
    python benchmarks/speed_settings.py --device cuda --amp bf16

Every arm is the same model with the same weights, trained by the real guarded train_step on the same
device-resident batches, one step of every arm per round in a rotating order (benchmarks/bench_train.py's
interleaving), so load from other processes hits all arms alike; each arm's speed-up is the median of its
per-round step-time ratios against `eager`. Compilation happens before the timed steps and is reported
apart (seconds of the first compiled step, which traces and compiles). Other flags are training settings
(config.py); `--channels-last` and `--compile` are set per arm. Exit codes: 0 done, 1 a timed step was
skipped or non-finite, 2 bad usage.
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


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_enhanced_adaptivestream as T  # noqa: E402
import bench_train as B  # noqa: E402
from config import Config, ConfigError, load_config, parser_flags  # noqa: E402

ARMS = {"eager": ("off", "off"), "channels_last": ("on", "off"), "compile": ("off", "on"),
        "channels_last+compile": ("on", "on")}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog="speed_settings.py", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)} (default all)")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(rest, prog="speed_settings.py", own_flags=parser_flags(parser))
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or "eager" not in args.arms:
        raise ConfigError(f"--arms: {', '.join(unknown) or 'eager is missing'}; choose from {', '.join(ARMS)} "
                          f"(eager is the reference)")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    return args, cfg


def measure(args: argparse.Namespace, cfg: Config) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = T.build_run(Config(**{**cfg.to_dict(), "out_dir": tmp, "channels_last": "off", "compile": "off"}),
                           Path(tmp))
        batches = B.make_batches(base, 4)
        arms, first_step_s = {}, {}
        for name in args.arms:
            channels_last, compiled = ARMS[name]
            arm_cfg = Config(**{**base.cfg.to_dict(), "channels_last": channels_last, "compile": compiled})
            model = T.build_model(arm_cfg)
            model.load_state_dict(T.unwrap(base.model).state_dict())
            arms[name] = B.run_with_model(dataclasses.replace(base, cfg=arm_cfg), model, guarded=True)
        inputs = {name: [T.to_device({"image": b[0].cpu(), "mask": b[1].cpu(), "label": b[2].cpu()}, arm)
                         for b in batches] for name, arm in arms.items()}  # each arm's memory format
        for name, arm in arms.items():
            if arm.compile_pending:
                start = time.perf_counter()
                B.compile_arms({name: arm}, inputs[name][0])
                first_step_s[name] = time.perf_counter() - start
        times = {name: [] for name in arms}
        for i in range(args.warmup + args.steps):
            shift = i % len(arms)
            for name in list(arms)[shift:] + list(arms)[:shift]:
                B.sync(base.device)
                start = time.perf_counter()
                T.train_step(arms[name], *inputs[name][i % len(batches)])
                B.sync(base.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    return {"settings": {"image_size": cfg.image_size, "batch_size": cfg.batch_size, "amp": base.cfg.amp,
                         "backbone": cfg.backbone, "device": str(base.device), "steps": args.steps},
            "machine": B.describe_machine(base.device),
            "arms": {name: {"train_images_per_s": cfg.batch_size / statistics.median(t),
                            "speedup_vs_eager": B.median_ratio(times["eager"], t),
                            "speedup_quartiles": B.ratio_quartiles(times["eager"], t),
                            "first_step_s": first_step_s.get(name)} for name, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def parse_and_measure() -> tuple[argparse.Namespace, dict]:
        args, cfg = parse_args(argv)
        return args, measure(args, cfg)

    code, measured = B.run_measurement(parse_and_measure)
    if code:
        return code
    args, result = measured
    s, m = result["settings"], result["machine"]
    print(f"{s['backbone']}, {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, amp {s['amp']}, "
          f"{s['device']} "
          f"({m['cpu']}, {m['torch_threads']} threads); median of {s['steps']} interleaved rounds")
    print("| arm | train img/s | speed-up vs eager (per-round median, quartiles) | first step (compilation) |")
    print("| --- | --- | --- | --- |")
    for name, arm in result["arms"].items():
        first = "" if arm["first_step_s"] is None else f"{arm['first_step_s']:.0f} s"
        print(f"| {name} | {arm['train_images_per_s']:.1f} | {arm['speedup_vs_eager']:.2f}x "
              f"({arm['speedup_quartiles'][0]:.2f}-{arm['speedup_quartiles'][1]:.2f}) | {first} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
