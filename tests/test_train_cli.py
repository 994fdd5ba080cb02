"""End to end: the real main() on a tiny config, its outputs, resume, and checkpoint validation."""

import csv
import math
import os

import pytest
import torch
import yaml

import train_enhanced_adaptivestream as T
from data import IMAGENET_MEAN
import results
from conftest import TINY


def test_main_trains_and_writes_the_run_folder(tiny_args, tmp_path):
    assert T.main(tiny_args) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "steps.jsonl", "train.log", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == results.METRIC_COLUMNS
    assert all(math.isfinite(float(r["val_miou"])) and r["skipped_steps"] == "0" for r in rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["image_size"] == 32 and "out_dir" not in saved and "resume" not in saved  # it repeats the run
    payload = T.load_checkpoint(run / "last.pt")
    assert payload["state"]["epoch"] == 2 and payload["state"]["step"] == 8
    assert payload["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert "epoch 2/2" in (run / "train.log").read_text()


def test_resume_continues_from_the_saved_epoch(tiny_args, tmp_path):
    assert T.main(tiny_args) == 0
    run = tmp_path / "run"
    assert T.main(tiny_args + ["--epochs", "3", "--resume", str(run / "last.pt")]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert T.load_checkpoint(run / "last.pt")["state"]["step"] == 12


def test_bad_config_returns_2_and_names_the_key(tmp_path, capsys):
    assert T.main(TINY + ["--out-dir", str(tmp_path / "r"), "--min-lr", "1"]) == 2
    assert "min_lr" in capsys.readouterr().err


def payload_for(tmp_path, tiny_args):
    assert T.main(tiny_args) == 0
    return tmp_path / "run" / "last.pt"


def test_checkpoint_validation_names_the_file_and_the_problem(tmp_path, tiny_args):
    path = payload_for(tmp_path, tiny_args)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(T.CheckpointError, match="truncated.pt cannot be read"):
        T.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(T.CheckpointError, match="foreign.pt is not a checkpoint of this script"):
        T.load_checkpoint(foreign)
    payload = torch.load(path, weights_only=True)
    payload["model"]["seg_head.weight"][0, 0] = float("nan")
    nan_file = tmp_path / "nan.pt"
    torch.save(payload, nan_file)
    with pytest.raises(T.CheckpointError, match=r"nan.pt has non-finite weights: seg_head.weight \(1 NaN"):
        T.load_checkpoint(nan_file)
    cfg = T.load_config(tiny_args + ["--num-seg-classes", "3"])
    with pytest.raises(T.CheckpointError, match="num_seg_classes=4.*num_seg_classes=3"):
        T.load_checkpoint(path, cfg)
    with pytest.raises(T.CheckpointError, match="missing.pt does not exist"):
        T.load_checkpoint(tmp_path / "missing.pt")


def test_resume_from_a_bad_checkpoint_exits_2(tmp_path, tiny_args, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert T.main(tiny_args + ["--resume", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_non_finite_weights_are_never_written(tmp_path):
    good = tmp_path / "last.pt"
    assert T.save_checkpoint(good, {"format": T.CHECKPOINT_FORMAT, "model": {"w": torch.ones(2)}})
    before = good.read_bytes()
    assert not T.save_checkpoint(good, {"format": T.CHECKPOINT_FORMAT, "model": {"w": torch.tensor([1.0, math.inf])}})
    assert good.read_bytes() == before
    assert not (tmp_path / "last.pt.tmp").exists()


def test_deterministic_flag_sets_deterministic_algorithms_and_the_cublas_workspace(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the test leaves the variable as it found it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cfg = T.load_config(TINY + ["--deterministic"])
    try:
        T.configure_backends(cfg, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        T.configure_backends(T.load_config(TINY), torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
