"""The step guard: a skipped step leaves parameters, optimizer state and BN buffers bit-identical."""

import copy
import json

import pytest
import torch

import train_enhanced_adaptivestream as T
from conftest import assert_same_training_state


def first_batch(run):
    return T.to_device(next(iter(run.train_loader)), run)


def snapshot(run):
    return copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.optimizer.state_dict())


def assert_unchanged(before, run):
    model_state, optimizer_state = before
    after = run.model.state_dict()
    for name, tensor in model_state.items():
        assert torch.equal(tensor, after[name]), f"{name} changed on a skipped step"
    state_after = run.optimizer.state_dict()["state"]
    for index, entry in optimizer_state["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(tensor, state_after[index][key]), f"optimizer state {index}.{key} changed"


def test_accepted_step_changes_weights_and_bn_buffers(make_run):
    run = make_run()
    images, masks, labels = first_batch(run)
    before = snapshot(run)
    stats = T.train_step(run, images, masks, labels)
    assert stats[4].item() == 0
    after = run.model.state_dict()
    assert not torch.equal(before[0]["encoder.stages.0.0.0.weight"], after["encoder.stages.0.0.0.weight"])
    assert not torch.equal(before[0]["encoder.stages.0.0.1.running_mean"], after["encoder.stages.0.0.1.running_mean"])


def test_nan_batch_is_skipped_and_changes_nothing(make_run):
    run = make_run()
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)  # optimizer state exists from here on
    before = snapshot(run)
    poisoned = images.clone()
    poisoned[0, :, 3, 3] = float("nan")  # a NaN pixel pollutes BN running stats in train mode
    stats = T.train_step(run, poisoned, masks, labels)
    assert T.SKIP_REASONS[int(stats[4])] == "non-finite loss"
    assert_unchanged(before, run)
    assert all(torch.isfinite(b).all() for b in run.guard.buffers)


def test_inf_gradient_is_skipped_and_changes_nothing(make_run):
    run = make_run()
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)
    before = snapshot(run)
    weight = run.model.seg_head.weight
    handle = weight.register_hook(lambda grad: grad * float("inf"))
    stats = T.train_step(run, images, masks, labels)
    handle.remove()
    assert torch.isfinite(stats[0])
    assert T.SKIP_REASONS[int(stats[4])] == "non-finite gradient"
    assert_unchanged(before, run)


def test_exploding_gradient_is_skipped(make_run):
    run = make_run()
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)
    before = snapshot(run)
    handle = run.model.seg_head.weight.register_hook(lambda grad: grad * 1e7)
    stats = T.train_step(run, images, masks, labels)
    handle.remove()
    assert stats[3].item() > run.cfg.skip_grad_norm
    assert T.SKIP_REASONS[int(stats[4])] == "gradient explosion"
    assert_unchanged(before, run)


def test_gradient_spike_against_running_median_is_skipped(make_run):
    run = make_run("--grad-spike-factor", "5", "--spike-warmup", "3")
    images, masks, labels = first_batch(run)
    for _ in range(4):
        assert T.train_step(run, images, masks, labels)[4].item() == 0
    handles = [p.register_hook(lambda grad: grad * 20) for p in run.model.parameters()]
    stats = T.train_step(run, images, masks, labels)
    for handle in handles:
        handle.remove()
    assert stats[3].item() < run.cfg.skip_grad_norm
    assert T.SKIP_REASONS[int(stats[4])] == "gradient spike"
    assert run.guard.accepted.item() == 4


def test_skips_are_counted_logged_with_step_and_written_to_steps_jsonl(make_run, caplog, monkeypatch):
    run = make_run("--max-skip-fraction", "1.0", "--epochs", "1", "--warmup-epochs", "0")
    original = T.train_step
    calls = []

    def poison_second(run_, images, masks, labels):
        calls.append(1)
        if len(calls) == 2:
            images = images.clone().fill_(float("nan"))
        return original(run_, images, masks, labels)

    monkeypatch.setattr(T, "train_step", poison_second)
    with caplog.at_level("WARNING", logger="adaptivestream"):
        stats = T.train_one_epoch(run, 0)
    assert stats["skipped_steps"] == 1 and run.state.skipped == {"non-finite loss": 1}
    assert "step 1 skipped: non-finite loss" in caplog.text
    events = [json.loads(line) for line in (run.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "skip"] == [1]


def test_too_many_skipped_steps_stop_the_run(make_run, monkeypatch):
    run = make_run("--max-skip-fraction", "0.25", "--epochs", "1", "--warmup-epochs", "0")
    original = T.train_step
    monkeypatch.setattr(T, "train_step", lambda r, i, m, l: original(r, i.clone().fill_(float("inf")), m, l))
    with pytest.raises(T.TrainingFailed, match="steps in epoch 1 were skipped"):
        T.train_one_epoch(run, 0)


def test_a_skipped_step_does_not_advance_the_lr_schedule(make_run, monkeypatch):
    # 8 warm-up steps: the LR grows by base/8 per applied update, so one step too many shows
    run = make_run("--max-skip-fraction", "1.0", "--epochs", "4", "--warmup-epochs", "2", "--log-interval", "4")
    original, calls = T.train_step, []

    def poison_second(run_, images, masks, labels):
        calls.append(1)
        return original(run_, images.clone().fill_(float("nan")) if len(calls) == 2 else images, masks, labels)

    monkeypatch.setattr(T, "train_step", poison_second)
    T.train_one_epoch(run, 0)
    assert run.state.step == 4 and run.state.skipped == {"non-finite loss": 1}
    assert run.scheduler.last_epoch == 3  # 3 applied updates
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(run.cfg.base_lr * 4 / 8, rel=1e-12)


def test_resume_restores_the_guards_spike_statistics(make_run, tmp_path):
    flags = ("--grad-spike-factor", "1000", "--spike-warmup", "2")
    run = make_run(*flags)
    images, masks, labels = first_batch(run)
    for _ in range(3):
        assert T.train_step(run, images, masks, labels)[4].item() == 0
    path = tmp_path / "saved.pt"
    assert T.save_checkpoint(path, T.checkpoint_payload(run))
    fresh = make_run(*flags)
    T.resume(fresh, T.load_checkpoint(path))
    assert fresh.guard.accepted.item() == 3
    assert torch.equal(fresh.guard.history[:, :3], run.guard.history[:, :3])
    assert fresh.guard.history[:, 3:].isnan().all()
    assert_same_training_state(T.training_state(run), T.training_state(fresh))


def test_recalibrate_bn_sets_running_stats_to_the_plain_average_over_the_batches(make_run):
    run = make_run()
    norm = run.model.encoder.stages[0][0][1]  # the first BN: its input is the first conv's output
    norm.running_mean.fill_(1e6)  # poisoned
    inputs = []
    handle = run.model.encoder.stages[0][0][0].register_forward_hook(lambda m, i, out: inputs.append(out.detach()))
    T.recalibrate_bn(run.model, run.train_loader, 2, run.device)
    handle.remove()
    assert len(inputs) == 2 and norm.momentum == 0.1 and norm.num_batches_tracked.item() == 2
    # momentum=None: each batch counts 1/2, not the 0.1/0.9 of an exponential average
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-5, atol=1e-6)
