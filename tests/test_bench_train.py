"""benchmarks/bench_train.py runs end to end on a tiny config and reports every figure as a finite number."""

import json
import math

import torch

from conftest import TINY, load_benchmark

import train_enhanced_adaptivestream as T
from config import load_config


def load_bench():
    return load_benchmark("bench_train")


def test_bench_train_reports_every_figure_as_a_finite_number(tmp_path):
    out = tmp_path / "bench.json"
    argv = TINY + ["--steps", "2", "--warmup", "1", "--eval-batches", "2", "--loader-batches", "2",
                   "--json", str(out)]
    assert load_bench().main(argv) == 0
    result = json.loads(out.read_text())
    ours = result["ours"]
    for key in ("params", "gflops_per_image", "peak_memory_mb", "train_images_per_s", "train_step_ms",
                "unguarded_images_per_s", "guard_ratio", "guard_alone_ms", "guard_alone_fraction", "snapshot_ms",
                "achieved_train_gflops", "fraction_of_matmul", "eval_images_per_s"):
        assert math.isfinite(ours[key]) and ours[key] > 0, f"ours.{key} = {ours[key]}"
    for value in (result["matmul_gflops"], result["loader"]["images_per_s"], result["loader"]["first_batch_s"]):
        assert math.isfinite(value) and value > 0
    q1, q3 = ours["guard_ratio_quartiles"]
    assert 0 < q1 <= q3 and math.isfinite(q3)
    assert ours["params"] == sum(p.numel() for p in T.build_model(load_config(TINY)).parameters())
    # 3 x forward FLOPs x images/s, by definition
    assert math.isclose(ours["achieved_train_gflops"], 3 * ours["gflops_per_image"] * ours["train_images_per_s"])
    assert result["settings"]["image_size"] == 32 and result["loader"]["dataset"] == "synthetic"


def test_bench_train_refuses_to_time_skipped_steps(capsys):
    # Every step is skipped when the threshold is below any real gradient norm: no timing is reported.
    argv = TINY + ["--steps", "2", "--warmup", "1", "--skip-grad-norm", "1e-9"]
    assert load_bench().main(argv) == 1
    err = capsys.readouterr().err
    assert "gradient explosion" in err and "would not be of real training steps" in err


def test_a_typo_of_the_benchmarks_own_flag_suggests_that_flag(capsys):
    assert load_bench().main(TINY + ["--stpes", "2"]) == 2
    assert "unknown flag --stpes (did you mean '--steps'?)" in capsys.readouterr().err


def test_the_matmul_ceiling_is_timed_in_fp32_even_where_training_allows_tf32(monkeypatch):
    """configure_backends sets float32 matmul precision "high" on CUDA (TF32 tensor cores): the fp32 ceiling
    must not be timed that way, and the training setting must come back."""
    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: seen.append(torch.get_float32_matmul_precision()) or mm(a, b))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert load_bench().measure_matmul_gflops(torch.device("cpu"), repeats=1) > 0
        assert set(seen) == {"highest"} and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
