"""Deep supervision (AUX_WEIGHT): the aux head exists only when it is weighted, its term is optimised and
guarded but never reported, a skipped step leaves it untouched, and checkpoints say when it does not fit."""

import copy

import pytest
import torch
import torch.nn.functional as F

import diagnose_training as D
import train_enhanced_adaptivestream as T
from config import load_config
from conftest import TINY, assert_same_training_state

AUX = ["--aux-weight", "0.4"]


def first_batch(run):
    return T.to_device(next(iter(run.train_loader)), run)


def undo_schedule_step(run):
    """train_step steps the schedule; the loop takes a skipped step back (the schedule counts updates)."""
    run.scheduler.last_epoch -= 1
    run.scheduler.refresh()


def test_the_aux_head_exists_only_when_weighted_and_gives_stride_8_logits():
    cfg = load_config(TINY + AUX + ["--image-size", "64"])
    model = T.build_model(cfg)
    x = torch.randn(2, 3, 64, 64)
    seg, cls, aux = model(x, aux=True)
    assert seg.shape == (2, 4, 64, 64) and cls.shape == (2, 3) and aux.shape == (2, 4, 8, 8)
    assert len(model.eval()(x)) == 2  # inference (evaluate, predict, export) never sees it
    plain = T.build_model(load_config(TINY + ["--image-size", "64"]))  # TINY has --aux-weight 0
    assert plain.aux_head is None and not [k for k in plain.state_dict() if k.startswith("aux_head")]
    assert model.state_dict().keys() - plain.state_dict().keys() == {"aux_head.weight", "aux_head.bias"}
    with pytest.raises(ValueError, match="without an aux head"):
        plain(x, aux=True)


def test_the_step_optimises_the_aux_term_and_reports_the_loss_without_it(make_run):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    probe = copy.deepcopy(run.model)
    rng = torch.random.get_rng_state()  # the cls head's dropout draws the same in the probe and the step
    objective, loss, parts, _ = T.training_objective(probe, run.loss_fn, images, masks, labels)
    torch.random.set_rng_state(rng)
    with torch.no_grad():
        coarse = probe(images, aux=True)[2]  # train mode: batch statistics, so the logits the objective saw
    upsampled = F.interpolate(coarse, scale_factor=8, mode="nearest")  # each coarse logit over its 8x8 pixels
    expected = 0.4 * F.cross_entropy(run.loss_fn.bound(upsampled), masks)
    assert objective.item() - loss.item() == pytest.approx(expected.item(), rel=1e-4)
    torch.random.set_rng_state(rng)
    head = run.model.aux_head.weight.detach().clone()
    row = T.train_step(run, images, masks, labels)
    assert row[0].item() == loss.item() and row[1].item() == parts["seg"].item()  # reported: no aux term
    assert int(row[4]) == 0  # accepted
    assert not torch.equal(head, run.model.aux_head.weight)  # the aux term reached its head


@pytest.mark.parametrize("size, weights, smoothing, ignore", [((64, 64), None, 0.0, 255),
                                                             ((50, 70), [0.5, 2.0, 1.0, 3.0], 0.1, 255),
                                                             ((33, 96), [1.0, 1.0, 4.0, 0.2], 0.0, 255),
                                                             ((40, 40), [0.5, 2.0, 1.0, 3.0], 0.1, 0)])
def test_the_aux_term_from_cell_counts_equals_the_cross_entropy_of_nearest_upsampled_logits(size, weights, smoothing,
                                                                                            ignore):
    """aux() never upsamples: it weighs each coarse logit by the class counts of the 8x8 target pixels it
    covers. That must be F.cross_entropy of the logits repeated over those pixels, value and gradient, with
    class weights, label smoothing, ignored pixels (also an ignore_index that is one of the classes) and sizes
    that are no multiple of 32 (target padded)."""
    torch.manual_seed(0)
    height, width = size
    loss_fn = T.StableLoss(seg_class_weights=weights, label_smoothing=smoothing, aux_weight=0.4, ignore_index=ignore)
    coarse = (torch.randn(3, 4, 4 * -(-height // 32), 4 * -(-width // 32)) * 10).requires_grad_()
    target = torch.randint(0, 4, (3, height, width))
    target[0, :5, :7] = ignore
    target[1, -9:, -3:] = ignore
    term = loss_fn.aux(coarse, target, 8)
    upsampled = F.interpolate(coarse, scale_factor=8, mode="nearest")[..., :height, :width]
    reference = 0.4 * F.cross_entropy(loss_fn.bound(upsampled), target, ignore_index=ignore, label_smoothing=smoothing,
                                      weight=None if weights is None else torch.tensor(weights))
    assert term.item() == pytest.approx(reference.item(), rel=1e-6)
    grad, = torch.autograd.grad(term, coarse)
    grad_ref, = torch.autograd.grad(reference, coarse)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-8)


def test_a_skipped_step_leaves_the_aux_head_weights_moments_and_bn_buffers_bit_identical(make_run):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)  # optimizer moments exist, including the aux head's
    before = copy.deepcopy(T.training_state(run))
    poisoned = images.clone()
    poisoned[0, :, 3, 3] = float("nan")
    assert T.SKIP_REASONS[int(T.train_step(run, poisoned, masks, labels)[4])] == "non-finite loss"
    undo_schedule_step(run)
    after = T.training_state(run)
    assert_same_training_state(before, after)
    assert "aux_head.weight" in after["model"]


def test_the_guard_sees_a_non_finite_aux_term_that_the_reported_loss_does_not_show(make_run, monkeypatch):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)
    before = copy.deepcopy(T.training_state(run))
    monkeypatch.setattr(run.loss_fn, "aux", lambda logits, target, stride: logits.sum() * float("nan"))
    row = T.train_step(run, images, masks, labels)
    assert torch.isfinite(row[0]) and T.SKIP_REASONS[int(row[4])] == "non-finite loss"
    undo_schedule_step(run)
    assert_same_training_state(before, T.training_state(run))


def test_a_checkpoint_with_the_aux_head_evaluates_as_saved_and_names_aux_weight_when_told_otherwise(tmp_path):
    run = tmp_path / "run"
    assert T.main(TINY + AUX + ["--epochs", "1", "--out-dir", str(run)]) == 0
    payload = T.load_checkpoint(run / "best.pt")
    assert "aux_head.weight" in payload["model"] and payload["config"]["aux_weight"] == 0.4
    # its own setting applies (TINY's --aux-weight 0 is not given here)
    assert T.main(["--eval-only", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "eval")]) == 0
    with pytest.raises(T.CheckpointError, match=r"aux_weight=0.4.*aux_weight=0\.0.*leave --aux-weight out"):
        T.load_checkpoint(run / "best.pt", load_config(TINY))


def test_diagnose_sends_the_gradient_through_the_aux_head(make_run):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    checks = D.check_gradients(run.model, images, masks, labels, run.loss_fn, run.cfg)
    flow = next(c for c in checks if c.name == "grad.flow")
    assert flow.status == "PASS", flow
