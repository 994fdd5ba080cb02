"""torchrun with two CPU processes (Gloo): ranks stay bit-identical, the guard decides together,
metrics equal a one-process evaluation, and checkpoints move between process counts."""

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import train_enhanced_adaptivestream as T
from data import build_datasets, build_loaders
from config import load_config
from conftest import ROOT, TINY, assert_same_training_state
from test_train_cli import capture_resumed_run, expected_first_batch

ARGS = TINY + ["--synthetic-val-size", "7", "--log-interval", "1"]  # 7: the two val shards differ in size


def torchrun(tmp_path, inject="", extra=()):
    dump = tmp_path / "dump"
    dump.mkdir()
    env = dict(os.environ, DDP_TEST_DUMP=str(dump), DDP_TEST_INJECT=inject, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "_ddp_worker.py"), *ARGS, *extra, "--out-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)], proc.stderr


def assert_same_weights(rank0, rank1):
    assert rank0["weights"].keys() == rank1["weights"].keys()
    for name, tensor in rank0["weights"].items():
        assert torch.equal(tensor, rank1["weights"][name]), name


AUX = ["--aux-weight", "0.4"]
SPIKE_STATS = ["--grad-spike-factor", "1000", "--spike-warmup", "2"]  # the guard's statistics move (never fire)


def test_two_processes_agree_and_their_metrics_equal_a_one_process_evaluation(tmp_path, monkeypatch):
    # with the aux head (the default model; TINY has none): its extra output and gradient go through DDP
    (rank0, rank1), console = torchrun(tmp_path, extra=SPIKE_STATS + AUX + ["--scale-lr"])
    assert_same_weights(rank0, rank1)
    # --scale-lr: the optimizer's peak is base_lr x 2, while config.yaml keeps base_lr as given (so that it
    # repeats the run rather than scaling twice)
    run_dir = tmp_path / "run"
    assert T.load_checkpoint(run_dir / "last.pt")["scheduler"]["base_lrs"] == [2e-3, 2e-3]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["base_lr"] == 1e-3
    assert "peak LR 0.002 (base_lr 0.001, scale_lr True)" in console
    # What the user reads counts the whole val split, once: rank 1 repeats no verdict line.
    assert "| 16 train, 7 val images" in console and "16 train / 7 val images" in console
    assert "[rank error]" not in console and console.count("verdict: seg") == 1
    row = list(csv.DictReader(open(run_dir / "metrics.csv")))[-1]
    cfg = load_config(ARGS + AUX + ["--out-dir", str(run_dir)])
    model = T.build_model(cfg)
    assert len(model.aux_heads) == len(cfg.aux_strides) > 0
    model.load_state_dict(T.load_checkpoint(run_dir / "last.pt", cfg)["model"])
    train_ds, val_ds = build_datasets(cfg)
    _, val_loader = build_loaders(cfg, train_ds, val_ds, torch.device("cpu"))
    single = T.evaluate(model, val_loader, T.build_loss(cfg), cfg, torch.device("cpu"))
    assert int(single["seg_cm"].sum()) == 7 * 32 * 32  # every val pixel once, no padding duplicates
    for key in ("val_miou", "val_pixel_acc", "val_cls_acc", "val_loss"):
        assert float(row[key]) == pytest.approx(single[key], rel=1e-5), key
    # the 2-process checkpoint resumes in a single process: its whole training state, then epoch 3's first batch
    saved = T.load_checkpoint(run_dir / "last.pt")
    assert saved["guard"]["accepted"].item() == 4  # 2 steps per epoch on each rank
    captured = capture_resumed_run(monkeypatch)
    args = ARGS + SPIKE_STATS + AUX + ["--out-dir", str(run_dir), "--resume", str(run_dir / "last.pt"), "--epochs", "3"]
    assert T.main(args) == 0
    assert_same_training_state(saved, captured["state"], lr=False)
    assert torch.equal(captured["images"], expected_first_batch(args, saved, epoch=2))
    assert T.load_checkpoint(run_dir / "last.pt")["state"]["epoch"] == 3


def test_a_fault_on_rank_1_only_is_skipped_on_both_ranks_without_a_hang(tmp_path):
    # the NaN loss and the verdict stay on rank 1 (DDP does not spread them): only the guard's all-reduce can
    (rank0, rank1), _ = torchrun(tmp_path, inject="inf:0,loss:1,verdict:3", extra=["--max-skip-fraction", "1"])
    expected = {"non-finite gradient": 1, "non-finite loss": 1, "gradient explosion": 1}
    assert rank0["skipped"] == expected and rank1["skipped"] == expected
    assert_same_weights(rank0, rank1)


def draws():
    return {"torch": torch.rand(4), "numpy": torch.from_numpy(np.random.rand(4)), "python": random.random()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) if k != "python" else a[k] == b[k] for k in a)


def test_each_rank_keeps_its_own_random_streams_and_loader_seeds_across_resumes(tmp_path, make_run):
    """Checkpoints hold every rank's own RNG streams: a same-size resume gives each rank its own stream
    back, a 2-process checkpoint resumes in 1 process (rank 0's stream) and a 1-process one in 2
    (rank 1 seeds itself from SEED + 1, so the ranks' augmentation differs). DataLoader workers are
    seeded from SEED + rank."""
    dump = tmp_path / "dump"
    dump.mkdir()
    single = make_run()
    torch.save(T.checkpoint_payload(single), dump / "one.pt")
    one_stream = draws()
    env = dict(os.environ, DDP_TEST_DUMP=str(dump), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "_rng_worker.py"), *TINY, "--out-dir", str(tmp_path / "run2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["worker_seed"] != rank1["worker_seed"], "DataLoader workers seeded alike on both ranks"
    assert not same(rank0["saved"], rank1["saved"])
    for rank in (rank0, rank1):
        assert same(rank["restored"], rank["saved"]), "a same-size resume did not restore this rank's own stream"
    assert same(rank0["from_one"], one_stream), "1 -> 2: rank 0 did not get the single process's stream"
    assert not same(rank0["from_one"], rank1["from_one"]), "1 -> 2: both ranks draw the same numbers"
    T.restore_training_state(single, torch.load(dump / "two.pt", weights_only=True))
    assert same(draws(), rank0["saved"]), "2 -> 1: the single process did not get rank 0's stream"


def test_eval_only_under_torchrun_equals_a_one_process_evaluation(tmp_path):
    """--eval-only under torchrun loads the checkpoint into the model inside DDP and sums every rank's shard."""
    run_dir = tmp_path / "run"
    assert T.main(ARGS + ["--epochs", "1", "--out-dir", str(run_dir)]) == 0
    checkpoint = str(run_dir / "last.pt")
    assert T.main(ARGS + ["--eval-only", "--checkpoint", checkpoint, "--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_enhanced_adaptivestream.py"), *ARGS, "--eval-only", "--checkpoint", checkpoint,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert two["per_class"]["seg"] == one["per_class"]["seg"]  # counts over all 7 val images, each once
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5), key


def test_two_nodes_with_a_c10d_rendezvous_on_localhost_train_into_one_run_folder(tmp_path):
    """torchrun --nnodes 2 (two launches, one process each) as on two machines; Gloo on CPU."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
         str(ROOT / "train_enhanced_adaptivestream.py"), *TINY, "--epochs", "1", "--out-dir", str(run)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "global batch 8 = batch_size 4 x 2 process(es)" in (run / "train.log").read_text()
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1"]
