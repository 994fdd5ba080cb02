"""Shared fixtures: tiny configs (32x32 images, a few channels) so every test runs in seconds on a CPU."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_enhanced_adaptivestream as T  # noqa: E402
from config import load_config  # noqa: E402

TINY = ["--image-size", "32", "--width", "4", "--stream-channels", "16", "--decoder-channels", "4",
        "--synthetic-train-size", "16", "--synthetic-val-size", "8", "--batch-size", "4", "--epochs", "2",
        "--warmup-epochs", "0.5", "--log-interval", "2", "--device", "cpu",
        # amp auto would pick bf16 on CPUs with AMX or avx512_bf16: the same numbers on every machine need it fixed.
        "--amp", "off",
        # 8 steps do not learn the task (val mIoU ~0.15 against a majority-class baseline of 0.21): these runs test
        # the plumbing, so the verdict is logged but does not set the exit code. test_verdict.py tests it.
        "--no-require-learning"]


@pytest.fixture
def tiny_args(tmp_path):
    """Command-line flags of a tiny CPU run writing into tmp_path/run."""
    return TINY + ["--out-dir", str(tmp_path / "run")]


@pytest.fixture
def make_run(tmp_path):
    """Build a real Run (data, model, optimizer, guard) from tiny flags plus overrides."""

    def build(*extra: str) -> T.Run:
        cfg = load_config(TINY + ["--out-dir", str(tmp_path / "run"), *extra])
        run_dir = Path(cfg.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return T.build_run(cfg, run_dir)

    return build


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tiny tensors: a second intra-op thread only adds waiting (up to 10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
