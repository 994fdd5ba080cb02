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
        # auto settings depend on the machine (amp auto picks bf16 on CPUs with AMX): fixed, for the same
        # numbers everywhere.
        "--amp", "off", "--channels-last", "off", "--compile", "off",
        # No aux head: these runs test the plumbing on trajectories the tests were written against (the aux head's
        # init draws from the random stream, so every later weight starts elsewhere); test_aux.py runs the aux
        # head through the guard, compilation, checkpoints, evaluation and diagnose.
        "--aux-weight", "0",
        # The cls head on pooled means, as before CLS_POOL: the same trajectories (a max beside each mean doubles
        # the head's inputs and moves every later weight); test_model.py runs avgmax through the model, its
        # checkpoints and an old checkpoint's upgrade, and quick_test.py trains the default.
        "--cls-pool", "avg",
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


def assert_same_training_state(expected: dict, actual: dict, lr: bool = True) -> None:
    """Two training states (T.training_state / a checkpoint payload) hold bit-identical weights and BN buffers,
    optimizer moments and step counts, LR schedule position and guard statistics (NaN slots equal).
    lr=False: the param groups' current LR may differ (a rollback backs it off; a resume with more epochs
    stretches the schedule)."""
    import torch

    assert expected["model"].keys() == actual["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor.cpu(), actual["model"][name].cpu()), f"model.{name}"
    opt_e, opt_a = expected["optimizer"], actual["optimizer"]
    assert opt_e["state"].keys() == opt_a["state"].keys() and opt_e["state"], "optimizer state"
    for index, entry in opt_e["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(torch.as_tensor(tensor).cpu(), torch.as_tensor(opt_a["state"][index][key]).cpu()), \
                f"optimizer.state.{index}.{key}"
    if lr:
        assert [g["lr"] for g in opt_e["param_groups"]] == [g["lr"] for g in opt_a["param_groups"]]
    assert expected["scheduler"]["last_epoch"] == actual["scheduler"]["last_epoch"]
    guard_e, guard_a = expected["guard"], actual["guard"]
    assert torch.equal(guard_e["accepted"].cpu(), guard_a["accepted"].cpu()), "guard.accepted"
    history_e, history_a = guard_e["history"].cpu(), guard_a["history"].cpu()
    assert torch.equal(history_e.isnan(), history_a.isnan()), "guard.history (NaN slots)"
    assert torch.equal(history_e.nan_to_num(), history_a.nan_to_num()), "guard.history"
    assert bool(expected.get("ema")) == bool(actual.get("ema")), "ema kept in one state only"
    if expected.get("ema"):
        assert torch.equal(expected["ema"]["updates"].cpu(), actual["ema"]["updates"].cpu()), "ema.updates"
        for name, tensor in expected["ema"]["model"].items():
            assert torch.equal(tensor.cpu(), actual["ema"]["model"][name].cpu()), f"ema.{name}"


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, e.g. load_benchmark("bench_train")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
