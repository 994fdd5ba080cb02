"""EMA of the weights: skipped with the guard, restored on rollback and resume, evaluated and saved for inference."""

import csv
import json

import pytest
import torch

import train_enhanced_adaptivestream as T
from conftest import assert_same_training_state


def state_of(ema):
    return {k: v.clone() for k, v in ema.module.state_dict().items()}, ema.updates.clone()


def test_a_skipped_step_leaves_the_ema_bit_identical_and_an_accepted_one_moves_it(make_run):
    run = make_run("--ema-decay", "0.9", "--skip-grad-norm", "1e9")
    batch = next(iter(run.train_loader))
    images, masks, labels = T.to_device(batch, run)
    T.train_step(run, images, masks, labels)  # accepted
    before, updates = state_of(run.ema)
    assert updates.item() == 1
    run.guard.skip_grad_norm = 0.0  # every gradient norm now "explodes": the guard skips
    row = T.train_step(run, images, masks, labels)
    assert row[4].item() == 3  # skipped: gradient explosion
    after, updates_after = state_of(run.ema)
    assert updates_after.item() == 1
    for name in before:
        assert torch.equal(before[name], after[name]), name
    run.guard.skip_grad_norm = 1e9
    T.train_step(run, images, masks, labels)
    moved, _ = state_of(run.ema)
    weights = [n for n, _ in run.ema.module.named_parameters()]
    assert any(not torch.equal(before[n], moved[n]) for n in weights)


def test_ema_weight_follows_the_warmup_of_its_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = T.WeightEMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(torch.tensor(False))  # n = 0: decay min(0.99, 1/10) = 0.1, so ema moves 0.9 of the way
    assert ema.module.weight.item() == torch.tensor(0.9).item()


def test_ema_is_evaluated_saved_and_survives_resume_bit_identically(tiny_args, tmp_path, monkeypatch):
    from test_train_cli import capture_resumed_run

    args = tiny_args + ["--ema-decay", "0.9"]
    assert T.main(args) == 0
    run = tmp_path / "run"
    saved = T.load_checkpoint(run / "last.pt")
    assert saved["ema"]["updates"].item() == 8
    assert T.inference_weights(saved) is saved["ema"]["model"]
    assert not torch.equal(saved["ema"]["model"]["seg_head.weight"], saved["model"]["seg_head.weight"])
    captured = capture_resumed_run(monkeypatch)
    assert T.main(args + ["--epochs", "3", "--resume", str(run / "last.pt")]) == 0
    assert_same_training_state(saved, captured["state"], lr=False)  # the EMA included


def test_a_rollback_restores_the_ema(make_run):
    run = make_run("--ema-decay", "0.9")
    batch = next(iter(run.train_loader))
    run.snapshot = T.take_snapshot(run)
    snapshot_ema = {k: v.clone() for k, v in run.snapshot["ema"]["model"].items()}
    T.train_step(run, *T.to_device(batch, run))
    T.roll_back(run, "test")
    for name, tensor in run.ema.module.state_dict().items():
        assert torch.equal(tensor, snapshot_ema[name]), name
    assert run.ema.updates.item() == 0


def test_the_evaluated_ema_model_carries_the_models_current_batchnorm_statistics(make_run):
    run = make_run("--ema-decay", "0.9")
    for batch in list(run.train_loader)[:2]:
        T.train_step(run, *T.to_device(batch, run))
    evaluated = run.eval_model()
    assert evaluated is run.ema.module
    for (name, mine), theirs in zip(evaluated.named_buffers(), run.model.buffers()):
        assert torch.equal(mine, theirs), name


def test_with_bn_recalibration_the_saved_ema_holds_the_statistics_its_evaluation_used(tiny_args, tmp_path):
    """--bn-recalibrate re-estimates the EMA model's BatchNorm statistics before each evaluation: best.pt keeps
    those (not the training model's), so --eval-only of best.pt reproduces the val mIoU that selected it."""
    assert T.main(tiny_args + ["--ema-decay", "0.9", "--bn-recalibrate", "2", "--epochs", "1"]) == 0
    run = tmp_path / "run"
    best = T.load_checkpoint(run / "best.pt")
    running_means = [k for k in best["model"] if k.endswith("running_mean")]
    assert any(not torch.equal(best["ema"]["model"][k], best["model"][k]) for k in running_means)
    assert T.main(["--eval-only", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "eval")]) == 0
    logged = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["val_miou"])
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]["val_miou"]
    assert evaluated == pytest.approx(logged, abs=1e-6)


def test_with_bn_recalibration_the_ema_carries_the_models_statistics_until_the_first_estimate(make_run):
    """A checkpoint written before the first evaluation (checkpoint_every, SIGTERM) must not hold the EMA's
    fresh-init BatchNorm statistics (running_var 1), which --eval-only would use as they are."""
    run = make_run("--ema-decay", "0.5", "--bn-recalibrate", "2")
    T.train_step(run, *T.to_device(next(iter(run.train_loader)), run))
    saved = run.ema.state_dict()
    for name, theirs in run.model.named_buffers():
        assert torch.equal(saved["model"][name], theirs), name
    T.recalibrate_bn(run.eval_model(), run.train_loader, 2, run.device)
    run.ema.recalibrated = True  # as _end_epoch does
    T.train_step(run, *T.to_device(next(iter(run.train_loader)), run))
    own = run.ema.state_dict()["model"]
    assert not all(torch.equal(own[name], theirs) for name, theirs in run.model.named_buffers()
                   if name.endswith("running_var"))
