"""Fault injection: every bad step is skipped and accounted for, rollbacks restore exactly, nothing
written to disk is ever corrupt or non-finite, and a stopped run resumes bit-identically."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import train_enhanced_adaptivestream as T
from data import build_datasets
from conftest import ROOT, assert_same_training_state

TRAIN_STEP = T.train_step  # the real one, whatever a test patches


def events(run_dir, kind):
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def metrics(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


ONE_SET = ["--synthetic-train-sets", "1"]  # the same images (and the poisoned one) every epoch


def poison_sample(monkeypatch, index):
    """Make training sample `index` an image with a NaN pixel, on the CPU side like real bad data."""
    original = build_datasets

    def build(cfg):
        train, val = original(cfg)
        get = train.__getitem__

        class Poisoned(type(train)):
            def __getitem__(self, i):
                sample = get(i)
                if i == index:
                    sample["image"] = sample["image"].clone()
                    sample["image"][0, 1, 1] = float("nan")
                return sample

        train.__class__ = Poisoned
        return train, val

    monkeypatch.setattr(T, "build_datasets", build)


def test_nan_image_is_skipped_counted_and_its_batch_saved(monkeypatch, tiny_args, tmp_path):
    poison_sample(monkeypatch, 5)
    assert T.main(tiny_args + ONE_SET) == 0
    run_dir = tmp_path / "run"
    assert [r["skipped_steps"] for r in metrics(run_dir)] == ["1", "1"]  # sample 5 is in one batch per epoch
    skips = events(run_dir, "skip")
    assert [s["reason"] for s in skips] == ["non-finite loss"] * 2
    saved = T.load_bad_batch(skips[0]["file"])
    assert "train/5" in saved["ids"] and torch.isnan(saved["images"]).any()
    assert saved["step"] == skips[0]["step"] and saved["reason"] == "non-finite loss"
    payload = T.load_checkpoint(run_dir / "last.pt")
    assert payload["state"]["skipped"] == {"non-finite loss": 2}
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_inf_gradient_at_step_k_is_skipped_exactly_there(monkeypatch, tiny_args, tmp_path):
    original, calls = T.train_step, []

    def inject(run, images, masks, labels):
        calls.append(1)
        if len(calls) != 3:
            return original(run, images, masks, labels)
        handle = run.model.seg_head.bias.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            return original(run, images, masks, labels)
        finally:
            handle.remove()

    monkeypatch.setattr(T, "train_step", inject)
    assert T.main(tiny_args) == 0
    skips = events(tmp_path / "run", "skip")
    assert [(s["step"], s["reason"]) for s in skips] == [(2, "non-finite gradient")]
    assert (tmp_path / "run" / "bad_batches" / "step_2.pt").is_file()


def test_rollback_restores_the_snapshot_bit_for_bit_each_time_and_backs_off_the_lr(make_run):
    # 4 warm-up steps then cosine over 16: the LR moves every step, so restoring the wrong step shows.
    run = make_run("--epochs", "4", "--warmup-epochs", "1", "--grad-spike-factor", "1000", "--spike-warmup", "1")
    images, masks, labels = T.to_device(next(iter(run.train_loader)), run)
    T.train_step(run, images, masks, labels)
    run.snapshot = T.take_snapshot(run)
    saved = T._cpu_copy(T.training_state(run))  # the snapshot as it is now: step 1, lr = base x 2/4
    base = run.cfg.base_lr
    for rollback, scale in ((1, 0.5), (2, 0.25)):
        for _ in range(3):  # training between rollbacks mutates the restored tensors in place
            assert T.train_step(run, images, masks, labels)[4].item() == 0
        assert not torch.equal(saved["model"]["seg_head.weight"], run.model.seg_head.weight)
        event = T.roll_back(run, "test")
        assert_same_training_state(saved, T.training_state(run), lr=False)
        assert run.scheduler.last_epoch == 1
        assert event["rollbacks"] == rollback and run.state.lr_scale == scale
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(scale * base * 2 / 4, rel=1e-12)


def take_one_step(run):
    T.train_step(run, *T.to_device(next(iter(run.train_loader)), run))


def test_a_non_finite_parameter_after_an_accepted_step_rolls_back_to_the_snapshot(make_run, monkeypatch):
    run = make_run("--epochs", "1", "--log-interval", "1", "--warmup-epochs", "0")
    take_one_step(run)  # the snapshot then holds optimizer moments, not an empty state
    run.snapshot = T.take_snapshot(run)
    saved = T._cpu_copy(T.training_state(run))
    original, calls = T.train_step, []

    def corrupt_after_last_step(run_, images, masks, labels):
        out = original(run_, images, masks, labels)
        calls.append(1)
        if len(calls) == 4:  # an accepted step, then a weight goes NaN (as a bad fused kernel would leave it)
            with torch.no_grad():
                T.unwrap(run_.model).seg_head.weight.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(T, "train_step", corrupt_after_last_step)
    T.train_one_epoch(run, 0)
    assert [(e["step"], e["reason"]) for e in events(run.run_dir, "rollback")] == [
        (4, "parameters became non-finite")]
    assert run.state.rollbacks == 1 and run.state.skipped == {}
    assert_same_training_state(saved, T.training_state(run), lr=False)


def test_the_snapshot_is_refreshed_every_snapshot_every_accepted_steps(make_run, monkeypatch):
    run = make_run("--epochs", "1", "--log-interval", "1", "--snapshot-every", "3")
    run.snapshot = T.take_snapshot(run)
    original, states = T.train_step, []

    def record_state(run_, images, masks, labels):
        out = original(run_, images, masks, labels)
        states.append(T._cpu_copy(T.training_state(run_)))
        return out

    monkeypatch.setattr(T, "train_step", record_state)
    T.train_one_epoch(run, 0)  # 4 accepted steps
    assert len(states) == 4 and run.state.accepted_since_snapshot == 1
    assert_same_training_state(states[2], run.snapshot)  # refreshed after step 3, not again after step 4
    T.roll_back(run, "test")
    assert_same_training_state(states[2], T.training_state(run), lr=False)


def test_bad_batch_limit_caps_the_saved_batches_but_every_skip_is_logged(monkeypatch, tiny_args, tmp_path):
    poison_sample(monkeypatch, 5)  # in one batch per epoch: 2 skipped steps
    assert T.main(tiny_args + ONE_SET + ["--bad-batch-limit", "1"]) == 0
    run_dir = tmp_path / "run"
    skips = events(run_dir, "skip")
    assert [s["reason"] for s in skips] == ["non-finite loss"] * 2
    assert "file" in skips[0] and "file" not in skips[1]
    assert [p.name for p in (run_dir / "bad_batches").iterdir()] == [f"step_{skips[0]['step']}.pt"]


def test_consecutive_skips_roll_back_then_abort_with_a_pointer_to_the_bad_batches(monkeypatch, tiny_args, tmp_path,
                                                                                   capsys):
    original = T.train_step
    monkeypatch.setattr(T, "train_step", lambda r, i, m, l: original(r, i.clone().fill_(float("nan")), m, l)
                        if r.state.step >= 1 else original(r, i, m, l))
    code = T.main(tiny_args + ["--max-consecutive-skips", "1", "--max-rollbacks", "2", "--max-skip-fraction", "1",
                               "--log-interval", "1"])
    assert code == 1
    run_dir = tmp_path / "run"
    rollbacks = events(run_dir, "rollback")
    assert [r["rollbacks"] for r in rollbacks] == [1, 2] and rollbacks[-1]["lr_scale"] == 0.25
    err = capsys.readouterr().err
    assert "after 2 rollbacks already" in err and "diagnose_training.py --batch" in err
    assert len(list((run_dir / "bad_batches").glob("step_*.pt"))) == 3
    # The aborting interval's skip is on record too (it used to be lost with the abort).
    assert len(events(run_dir, "skip")) == sum(events(run_dir, "end")[-1]["skipped"].values()) == 3


def test_a_non_finite_checkpoint_is_never_written_and_the_previous_one_is_kept(make_run, tmp_path, caplog):
    # (A tiny run at LR 10 does not even diverge, so the refusal is tested on save_checkpoint itself.)
    run = make_run()
    path = run.run_dir / "last.pt"
    assert T.save_checkpoint(path, T.checkpoint_payload(run))
    good = path.read_bytes()
    with torch.no_grad():
        T.unwrap(run.model).seg_head.weight.view(-1)[:2] = float("nan")
    assert not T.save_checkpoint(path, T.checkpoint_payload(run))
    assert path.read_bytes() == good and not (run.run_dir / "last.pt.tmp").exists()
    assert "not writing" in caplog.text and "seg_head.weight (2 NaN, 0 Inf)" in caplog.text
    T.load_checkpoint(path)  # the kept file is a valid, finite checkpoint


def snapshot_weights(path):
    return T.load_checkpoint(path)["model"]


def recording_steps(monkeypatch, seen, signal_at=None, signum=signal.SIGTERM):
    """Patch train_step to record each step's batch (images, labels) into `seen`, and to send `signum` to
    this process after step number `signal_at` (1-based). Each call replaces the previous patch."""

    def step(run, images, masks, labels):
        seen.append((images.clone(), labels.clone()))
        out = TRAIN_STEP(run, images, masks, labels)
        if len(seen) == signal_at:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(T, "train_step", step)


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for i, ((images_e, labels_e), (images_a, labels_a)) in enumerate(zip(expected, actual)):
        assert torch.equal(images_e, images_a) and torch.equal(labels_e, labels_a), f"batch {i} after the resume"


# The guard's spike statistics only move with a spike factor set; 1000 never fires on these runs.
SPIKE_STATS = ["--grad-spike-factor", "1000", "--spike-warmup", "2"]


def test_sigterm_mid_epoch_then_resume_is_bit_identical_to_an_uninterrupted_run(monkeypatch, tmp_path):
    from conftest import TINY
    args = TINY + ["--epochs", "2", "--log-interval", "3"] + SPIKE_STATS
    straight_steps, preempted_steps, resumed_steps = [], [], []
    recording_steps(monkeypatch, straight_steps)
    assert T.main(args + ["--out-dir", str(tmp_path / "straight")]) == 0

    recording_steps(monkeypatch, preempted_steps, signal_at=6)  # in the middle of epoch 2 (4 steps per epoch)
    resumed = tmp_path / "resumed"
    assert T.main(args + ["--out-dir", str(resumed)]) == 0
    state = T.load_checkpoint(resumed / "last.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    recording_steps(monkeypatch, resumed_steps)
    assert T.main(args + ["--out-dir", str(resumed), "--resume", "auto"]) == 0
    assert_same_batches(straight_steps[6:], resumed_steps)  # the data position and the RNG came back
    straight, again = T.load_checkpoint(tmp_path / "straight" / "last.pt"), T.load_checkpoint(resumed / "last.pt")
    assert_same_training_state(straight, again)
    assert straight["guard"]["accepted"].item() == 8
    assert metrics(resumed)[-1]["val_miou"] == metrics(tmp_path / "straight")[-1]["val_miou"]
    assert metrics(resumed)[-1]["train_loss"] == metrics(tmp_path / "straight")[-1]["train_loss"]


def test_sigint_finishes_the_step_saves_last_pt_and_exits_130(monkeypatch, tiny_args, tmp_path):
    recording_steps(monkeypatch, [], signal_at=3, signum=signal.SIGINT)
    assert T.main(tiny_args) == 130
    run_dir = tmp_path / "run"
    (end,) = events(run_dir, "end")
    assert (end["outcome"], end["exit_code"], end["reason"]) == ("stopped", 130, "SIGINT at step 3")
    state = T.load_checkpoint(run_dir / "last.pt")["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (0, 3, 3)


def failing_at_step(monkeypatch, at, error):
    """train_step raises `error` on its `at`-th call (counted from 1); the steps before run for real."""
    calls = []

    def step(run, images, masks, labels):
        calls.append(1)
        if len(calls) == at:
            raise error
        return TRAIN_STEP(run, images, masks, labels)

    monkeypatch.setattr(T, "train_step", step)


def test_out_of_memory_names_the_settings_to_lower_exits_1_and_ends_the_record(monkeypatch, tiny_args, tmp_path):
    failing_at_step(monkeypatch, 3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert T.main(tiny_args) == 1  # no traceback: the settings, not the code
    (end,) = events(tmp_path / "run", "end")
    assert (end["outcome"], end["exit_code"], end["step"], end["failure"]) == ("failed", 1, 2, "out_of_memory")
    assert end["reason"] == "out of memory after step 2: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "out of memory in epoch 1 after step 2" in log_text and "lower --batch-size (now 4) or --image-size (now 32)" \
        in log_text


def test_an_unforeseen_error_keeps_its_traceback_and_still_ends_the_record(monkeypatch, tiny_args, tmp_path):
    failing_at_step(monkeypatch, 3, ZeroDivisionError("a bug in the code"))
    with pytest.raises(ZeroDivisionError, match="a bug in the code"):  # a bug's report is its traceback
        T.main(tiny_args)
    (end,) = events(tmp_path / "run", "end")
    assert (end["outcome"], end["exit_code"], end["reason"], end["failure"]) == (
        "failed", 1, "crashed: ZeroDivisionError: a bug in the code", "crash")


def test_disk_full_during_save_keeps_the_previous_checkpoint(monkeypatch, tiny_args, tmp_path):
    real_save, calls = torch.save, []

    def full_disk(obj, handle, *args, **kwargs):
        calls.append(getattr(handle, "name", ""))
        if str(calls[-1]).endswith("last.pt.tmp") and sum(str(c).endswith("last.pt.tmp") for c in calls) >= 2:
            handle.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(T.torch, "save", full_disk)
    assert T.main(tiny_args) == 1  # the final checkpoint could not be written: the run says so
    payload = T.load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["state"]["epoch"] == 1  # epoch 1's checkpoint survived epoch 2's failed write
    assert not (tmp_path / "run" / "last.pt.tmp").exists()


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, tiny_args, monkeypatch):
    script = textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads(1)  # as in this process (conftest), so the weights match bit for bit
        sys.path.insert(0, {str(ROOT)!r})
        import train_enhanced_adaptivestream as T
        real_save, writes = torch.save, []
        def hanging_save(obj, handle, *args, **kwargs):
            if str(getattr(handle, "name", "")).endswith("last.pt.tmp"):
                writes.append(1)
                if len(writes) == 2:
                    handle.write(b"partial")
                    handle.flush()
                    print("WRITING", flush=True)
                    time.sleep(120)
            return real_save(obj, handle, *args, **kwargs)
        torch.save = hanging_save
        sys.exit(T.main({tiny_args!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:
            if "WRITING" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    run_dir = tmp_path / "run"
    assert (run_dir / "last.pt.tmp").read_bytes() == b"partial"
    assert T.load_checkpoint(run_dir / "last.pt")["state"]["epoch"] == 1
    resumed_steps, straight_steps = [], []
    recording_steps(monkeypatch, resumed_steps)
    assert T.main(tiny_args + ["--resume", "auto"]) == 0
    resumed = T.load_checkpoint(run_dir / "last.pt")
    assert resumed["state"]["epoch"] == 2
    # the same run without the kill: the same epoch-2 batches and the same final training state
    recording_steps(monkeypatch, straight_steps)
    straight_args = [a if a != str(run_dir) else str(tmp_path / "straight") for a in tiny_args]
    assert T.main(straight_args) == 0
    assert_same_batches(straight_steps[4:], resumed_steps)
    assert_same_training_state(T.load_checkpoint(tmp_path / "straight" / "last.pt"), resumed)


def test_a_second_ctrl_c_during_the_checkpoint_write_lets_it_finish_and_exits_130(tmp_path, tiny_args):
    # The first Ctrl-C arrives mid-epoch; the second inside torch.save of the stop's last.pt (a real kill -INT
    # lands there only by luck). The write must finish: a complete last.pt of step 3, no .tmp, no traceback.
    script = textwrap.dedent(f"""
        import signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import train_enhanced_adaptivestream as T
        torch.set_num_threads(1)
        real_step, real_save, steps = T.train_step, torch.save, []
        def step(*args):
            steps.append(1)
            if len(steps) == 3:
                signal.raise_signal(signal.SIGINT)
            return real_step(*args)
        def save(obj, handle, *args, **kwargs):
            if steps and str(getattr(handle, "name", "")).endswith("last.pt.tmp"):
                signal.raise_signal(signal.SIGINT)
            return real_save(obj, handle, *args, **kwargs)
        T.train_step, torch.save = step, save
        sys.exit(T.main({tiny_args + ["--checkpoint-every", "0"]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "second Ctrl-C" in proc.stderr
    run_dir = tmp_path / "run"
    assert T.load_checkpoint(run_dir / "last.pt")["state"]["step"] == 3
    assert not (run_dir / "last.pt.tmp").exists()
    assert events(run_dir, "end")[-1]["outcome"] == "stopped"


def test_bf16_autocast_trains_on_cpu(tiny_args):
    assert T.main(tiny_args + ["--amp", "bf16", "--epochs", "1", "--warmup-epochs", "0"]) == 0


def test_amp_bf16_runs_convolutions_in_bfloat16_in_training_and_evaluation_and_the_loss_in_float32(make_run):
    run = make_run("--amp", "bf16")
    dtypes = []
    for module in (run.model.encoder.stages[0][0][0], run.model.seg_head, run.model.cls_head[-1]):
        module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    stats = T.train_step(run, *T.to_device(next(iter(run.train_loader)), run))
    assert dtypes == [torch.bfloat16] * 3 and stats.dtype == torch.float32 and stats[4].item() == 0
    dtypes.clear()
    T.evaluate(run.model, run.val_loader, run.loss_fn, run.cfg, run.device, run.autocast)  # as _end_epoch calls it
    assert dtypes == [torch.bfloat16] * 3 * len(run.val_loader)


def test_mid_epoch_checkpoints_record_the_data_position(monkeypatch, tiny_args):
    real_save, positions = T.save_checkpoint, []

    def record(path, payload, write=True):
        if path.name == "last.pt":
            positions.append((payload["state"]["epoch"], payload["state"]["batch"]))
        return real_save(path, payload, write)

    monkeypatch.setattr(T, "save_checkpoint", record)
    assert T.main(tiny_args + ["--checkpoint-every", "3", "--log-interval", "1", "--epochs", "2"]) == 0
    assert positions == [(0, 3), (1, 0), (1, 2), (2, 0)]  # steps 3 and 6 mid-epoch, then each epoch end
