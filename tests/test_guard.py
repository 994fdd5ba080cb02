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
    # skip_grad_norm out of the way: x20 gradients of the tiny model can pass the absolute limit too
    run = make_run("--grad-spike-factor", "5", "--spike-warmup", "3", "--skip-grad-norm", "1e4")
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


@pytest.mark.parametrize("poisoned, rollbacks", [
    ({0, 1, 2}, ["3 consecutive skipped steps (the last at step 2)"]),  # an accepted step follows in the interval
    ({2, 3, 4}, ["3 consecutive skipped steps (the last at step 4)"]),  # across two log intervals
    ({0, 1, 3, 4}, []),  # never 3 in a row
    # Step 3 ran on the weights the first rollback discards: steps 4, 5, 6 are the next three.
    (set(range(7)), ["3 consecutive skipped steps (the last at step 2)",
                     "3 consecutive skipped steps (the last at step 6)"]),
])
def test_a_rollback_follows_exactly_max_consecutive_skips_skipped_steps(make_run, monkeypatch, poisoned, rollbacks):
    run = make_run("--max-consecutive-skips", "3", "--log-interval", "4", "--synthetic-train-size", "32",
                   "--max-skip-fraction", "1", "--max-rollbacks", "5", "--epochs", "1", "--warmup-epochs", "0")
    run.snapshot = T.take_snapshot(run)
    original, calls = T.train_step, []

    def poison(run_, images, masks, labels):
        calls.append(1)
        if len(calls) - 1 in poisoned:  # the step about to run
            images = images.clone().fill_(float("nan"))
        return original(run_, images, masks, labels)

    monkeypatch.setattr(T, "train_step", poison)
    T.train_one_epoch(run, 0)
    events = [json.loads(line) for line in (run.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "rollback"] == rollbacks


def test_without_a_terminal_progress_is_a_plain_line_every_tenth_of_the_epoch(make_run, caplog, capsys):
    run = make_run("--synthetic-train-size", "80", "--log-interval", "1", "--epochs", "1")  # 20 steps, 20 flushes
    with caplog.at_level("INFO", logger="adaptivestream"):
        T.train_one_epoch(run, 0)
    lines = [r.getMessage() for r in caplog.records if "of the epoch" in r.getMessage()]
    assert [line.split("  ")[1] for line in lines] == [f"step {s}/20 of the epoch ({5 * s}%)" for s in range(2, 20, 2)]
    assert all(" img/s  skipped 0" in line for line in lines)
    assert "it/s" not in capsys.readouterr().err  # no progress bar in a captured stderr


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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_skipped_first_step_then_a_step_equals_one_clean_step_bit_for_bit(make_run, optimizer):
    """Fused SGD creates its momentum buffers with empty_like on the first step and its kernel returns
    early when found_inf is 1: a skipped first step would leave them as uninitialised memory."""
    clean, skipped = make_run("--optimizer", optimizer), make_run("--optimizer", optimizer)
    skipped.model.load_state_dict(clean.model.state_dict())
    images, masks, labels = first_batch(clean)
    torch.manual_seed(0)  # dropout draws the same in both runs
    T.train_step(clean, images, masks, labels)
    garbage = [torch.full_like(p, 1e30) for p in skipped.model.parameters()]  # freed memory empty_like may reuse
    del garbage
    handle = skipped.model.seg_head.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    assert T.SKIP_REASONS[int(T.train_step(skipped, images, masks, labels)[4])] == "non-finite gradient"
    handle.remove()
    skipped.scheduler.last_epoch -= 1  # as flush_interval does: the schedule counts applied updates
    skipped.scheduler.refresh()
    torch.manual_seed(0)
    T.train_step(skipped, images, masks, labels)
    for (name, a), b in zip(clean.model.state_dict().items(), skipped.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from a clean first step"
    state_a, state_b = clean.optimizer.state_dict()["state"], skipped.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index, entry in state_a.items():
        for key, tensor in entry.items():
            assert torch.equal(tensor, state_b[index][key]), f"optimizer state {index}.{key} differs"


def test_fp16_scaler_calibration_is_counted_apart_not_as_skips_or_bad_batches(make_run, caplog):
    """GradScaler starting far too high overflows on its first steps while it finds its scale: expected,
    so no bad-batch files, no skip toward MAX_SKIP_FRACTION or the rollback ladder, its own count."""
    run = make_run("--amp", "fp16", "--epochs", "1", "--warmup-epochs", "0", "--max-skip-fraction", "0.1",
                   "--max-consecutive-skips", "2")
    run.scaler = torch.amp.GradScaler(run.device.type, init_scale=2.0**40)  # overflows fp16 gradients for several steps
    with caplog.at_level("INFO", logger="adaptivestream"):
        stats = T.train_one_epoch(run, 0)
    overflows = run.state.fp16_overflows
    assert overflows >= 2, "the test needs calibration overflows"
    assert stats["fp16_overflows"] == overflows and stats["skipped_steps"] == 0
    assert run.state.skipped == {} and run.state.rollbacks == 0 and run.state.bad_batches_saved == 0
    assert not (run.run_dir / "bad_batches").exists()
    events = [json.loads(line) for line in (run.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "log"][-1]["fp16_overflows_epoch"] == overflows
    assert not [e for e in events if e["event"] == "skip"]


def test_unguarded_fp16_step_leaves_an_overflow_to_the_scaler(make_run):
    """The benchmark's unguarded arm (guard None) under fp16: an overflowed step must be skipped by
    GradScaler.step, not applied (after unscale_ the gradients hold inf, and clipping turns them into NaN)."""
    run = make_run("--amp", "fp16")
    run.guard = None
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)  # optimizer state exists from here on
    before = snapshot(run)
    handle = run.model.seg_head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    T.train_step(run, images, masks, labels)
    handle.remove()
    after = run.model.state_dict()
    for name, tensor in before[0].items():
        if "running" not in name and "num_batches" not in name:  # unguarded: BN statistics are not restored
            assert torch.equal(tensor, after[name]), f"{name} changed on an overflowed unguarded step"
    assert run.scaler.get_scale() < 65536.0


def test_bn_stash_and_restore_take_a_handful_of_ops_not_one_per_buffer(make_run):
    """87 BN buffers (float32 and int64): grouped by dtype, stash and restore are a few ops, not ~260 kernels."""
    from torch.profiler import ProfilerActivity, profile

    run = make_run()
    guard, skip, loss, grad_norm = run.guard, torch.tensor(True), torch.tensor(1.0), torch.tensor(1.0)
    assert len(guard.buffers) == 87
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        guard.stash_buffers()
        guard.commit(skip, loss, grad_norm)
    top_level = [e.name for e in prof.events() if e.cpu_parent is None]
    assert len(top_level) <= 10, top_level  # per dtype: cat (stash); cat, where, split, _foreach_copy_ (restore)


def test_lower_nanmedian_is_torch_nanmedian_without_its_indices():
    torch.manual_seed(0)
    rows = torch.randn(64, 9)
    rows[:, :4] = rows[:, :4].round()  # ties
    for r, missing in enumerate(torch.randint(0, 10, (64,)).tolist()):  # 0-9 NaN slots: even and odd counts,
        rows[r, torch.randperm(9)[:missing]] = float("nan")  # and rows of NaNs only
    torch.testing.assert_close(T.lower_nanmedian(rows), rows.nanmedian(dim=1).values, rtol=0, atol=0,
                               equal_nan=True)


# Ops that make the host wait for a CUDA device (a value or a data-dependent shape read back), or that CUDA's
# deterministic mode refuses (median with indices). The CPU runs them without complaint, so this test watches
# the dispatcher; tests/test_cuda.py checks the same on a GPU with sync debug mode and --deterministic.
WAITING_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.unique",
               "aten._unique", "aten.median.dim", "aten.nanmedian.dim", "aten.equal", "aten.is_nonzero")


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_guarded_steps_dispatch_no_op_that_waits_for_the_device(make_run):
    """Every check of the guard on, class weights, label smoothing and the aux heads: an accepted and a
    skipped step run only ops that the device can queue without telling the host anything."""
    run = make_run("--grad-spike-factor", "10", "--loss-spike-factor", "10", "--spike-warmup", "0",
                   "--seg-class-weights", "auto", "--cls-class-weights", "auto", "--label-smoothing", "0.1",
                   "--aux-weight", "1", "--ema-decay", "0.9")
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)  # warm-up: optimizer state
    poisoned = images.clone()
    poisoned[0, :, 3, 3] = float("nan")
    with OpLog() as log:
        accepted = T.train_step(run, images, masks, labels)
        skipped = T.train_step(run, poisoned, masks, labels)
    assert int(accepted[4]) == 0 and T.SKIP_REASONS[int(skipped[4])] == "non-finite loss"
    assert not {op for op in log.ops if op.startswith(WAITING_OPS)}, sorted(log.ops)
    assert {"aten.sort.default", "aten.sort.stable"} & log.ops  # the spike check ran
