"""CUDA only: steady-state training steps make no host synchronisation; the guard decides on the device.

torch.cuda.set_sync_debug_mode("error") raises on any call that makes the host wait for the GPU
(.item(), .cpu(), a data-dependent Python branch on a CUDA tensor, a blocking copy), so a step that
passes here keeps the GPU fed. The first steps are warm-up (optimizer state, kernel choice) and
run outside the check, as in a real run.
"""

import pytest
import torch

import test_guard
import train_enhanced_adaptivestream as T
from conftest import TINY
from test_guard import assert_unchanged, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def device_batches(run, count):
    """`count` training batches already on the GPU, so the checked steps include no input copy."""
    batches = []
    for batch in run.train_loader:
        batches.append(T.to_device(batch, run))
        if len(batches) == count:
            break
    torch.cuda.synchronize()
    return batches


def run_without_sync(run, batches, rounds):
    """train_step over batches `rounds` times under sync debug mode "error"; returns the stacked stats."""
    stats = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(rounds):
            for images, masks, labels in batches:
                stats.append(T.train_step(run, images, masks, labels))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return torch.stack(stats).cpu()


# Every check of the guard, class weights, label smoothing, aux heads and EMA (tests/test_guard.py watches the
# same step's ops on the CPU).
EVERYTHING = ("--grad-spike-factor", "10", "--loss-spike-factor", "10", "--spike-warmup", "0", "--seg-class-weights",
              "auto", "--cls-class-weights", "auto", "--label-smoothing", "0.1", "--aux-weight", "1", "--ema-decay", "0.9")


@pytest.fixture
def backends_reset():
    """--deterministic sets process-wide switches; the tests after this one run with the defaults again."""
    yield
    T.configure_backends(T.load_config(TINY), torch.device("cpu"))


@pytest.mark.parametrize("amp, extra", [("off", ()), ("bf16", ()), ("fp16", ()), ("bf16", EVERYTHING),
                                        # deterministic mode refuses some kernels (median with indices)
                                        ("off", EVERYTHING + ("--deterministic",))])
def test_steady_state_guarded_steps_make_no_host_sync(make_run, backends_reset, amp, extra):
    run = make_run("--device", "cuda", "--amp", amp, *extra)
    batches = device_batches(run, 2)
    for images, masks, labels in batches:
        T.train_step(run, images, masks, labels)  # warm-up: optimizer state, kernel selection
    stats = run_without_sync(run, batches, rounds=3)
    assert stats.shape == (6, 6)
    assert torch.isfinite(stats[:, 0]).all()
    # fp16's GradScaler may still be finding its scale: an overflowed step is skipped as a non-finite gradient.
    allowed = {0, 2} if amp == "fp16" else {0}
    assert set(stats[:, 4].int().tolist()) <= allowed, f"skip reasons: {stats[:, 4].tolist()}"


def test_skipped_nan_step_makes_no_host_sync_and_changes_nothing(make_run):
    run = make_run("--device", "cuda")
    (images, masks, labels), = device_batches(run, 1)
    for _ in range(2):
        T.train_step(run, images, masks, labels)
    before = snapshot(run)
    poisoned = images.clone()
    poisoned[0, :, 3, 3] = float("nan")  # poisons BN running stats in train mode unless the guard restores them
    stats = run_without_sync(run, [(poisoned, masks, labels)], rounds=1)
    assert T.SKIP_REASONS[int(stats[0, 4])] == "non-finite loss"
    assert_unchanged(before, run)


def test_steady_state_steps_through_the_dataloader_make_no_host_sync(make_run):
    """The real input path: pinned batches copied with non_blocking=True, then the guarded step."""
    run = make_run("--device", "cuda", "--num-workers", "1", "--synthetic-train-size", "32")
    batches = iter(run.train_loader)
    for _ in range(2):
        T.train_step(run, *T.to_device(next(batches), run))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [T.train_step(run, *T.to_device(batch, run)) for batch in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(stats) == 6 and torch.stack(stats)[:, 4].eq(0).all()


def test_skipped_first_sgd_step_equals_a_clean_step_on_cuda(make_run):
    test_guard.test_skipped_first_step_then_a_step_equals_one_clean_step_bit_for_bit(
        lambda *extra: make_run("--device", "cuda", "--deterministic", *extra), "sgd")


def test_fp16_calibration_is_counted_apart_on_cuda(make_run, caplog):
    test_guard.test_fp16_scaler_calibration_is_counted_apart_not_as_skips_or_bad_batches(
        lambda *extra: make_run("--device", "cuda", *extra), caplog)


def test_grouped_bn_restore_is_bit_identical_and_sync_free_on_cuda(make_run):
    run = make_run("--device", "cuda")
    (images, masks, labels), = device_batches(run, 1)
    T.train_step(run, images, masks, labels)
    buffers = [b.clone() for b in run.guard.buffers]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.guard.stash_buffers()
        for buf in run.guard.buffers:
            buf.add_(1)  # what a forward pass in train mode does to the running statistics
        run.guard.commit(torch.ones((), dtype=torch.bool, device="cuda"), torch.ones((), device="cuda"),
                         torch.ones((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(buffers, run.guard.buffers))
