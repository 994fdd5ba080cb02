"""Deep supervision (AUX_WEIGHT, AUX_STRIDES): the aux heads exist only when they are weighted, on the asked
decoder levels; their terms are optimised and guarded but never reported, a skipped step leaves them
untouched, and checkpoints say when they do not fit (and load from before AUX_STRIDES)."""

import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F

import diagnose_training as D
import train_enhanced_adaptivestream as T
from config import ConfigError, load_config
from conftest import TINY, assert_same_training_state

AUX = ["--aux-weight", "0.4", "--aux-strides", "16,8"]


def first_batch(run):
    return T.to_device(next(iter(run.train_loader)), run)


def undo_schedule_step(run):
    """train_step steps the schedule; the loop takes a skipped step back (the schedule counts updates)."""
    run.scheduler.last_epoch -= 1
    run.scheduler.refresh()


@pytest.mark.parametrize("strides", [[8], [16, 8], [4, 32]])
def test_the_aux_heads_exist_only_when_weighted_and_give_logits_at_their_strides(strides):
    cfg = load_config(TINY + ["--aux-weight", "0.4", "--aux-strides", ",".join(map(str, strides)),
                              "--image-size", "64"])
    model = T.build_model(cfg)
    x = torch.randn(2, 3, 64, 64)
    seg, cls, aux = model(x, aux=True)
    assert seg.shape == (2, 4, 64, 64) and cls.shape == (2, 3)
    assert {s: tuple(t.shape) for s, t in aux.items()} == {s: (2, 4, 64 // s, 64 // s) for s in strides}
    assert len(model.eval()(x)) == 2  # inference (evaluate, predict, export) never sees them
    plain = T.build_model(load_config(TINY + ["--image-size", "64"]))  # TINY has --aux-weight 0
    assert not plain.aux_heads and not [k for k in plain.state_dict() if k.startswith("aux")]
    assert model.state_dict().keys() - plain.state_dict().keys() == {f"aux_heads.{s}.{p}" for s in strides
                                                                      for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="without aux heads"):
        plain(x, aux=True)


def test_the_order_of_aux_strides_does_not_change_the_model():
    torch.manual_seed(0)
    a = T.build_model(load_config(TINY + ["--aux-weight", "0.4", "--aux-strides", "16,8"])).state_dict()
    torch.manual_seed(0)
    b = T.build_model(load_config(TINY + ["--aux-weight", "0.4", "--aux-strides", "8,16"])).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value, shown", [("12", "12"), ("8,8", "8, 8"), ("2,16", "2, 16")])
def test_bad_aux_strides_stop_with_a_message_that_names_the_key(value, shown):
    with pytest.raises(ConfigError, match=rf"aux_strides: \[{shown}\] must be one or more different strides of "
                                          r"32, 16, 8, 4"):
        load_config(TINY + ["--aux-strides", value])


def test_the_step_optimises_the_aux_term_and_reports_the_loss_without_it(make_run):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    probe = copy.deepcopy(run.model)
    rng = torch.random.get_rng_state()  # the cls head's dropout draws the same in the probe and the step
    objective, loss, parts, _ = T.training_objective(probe, run.loss_fn, images, masks, labels)
    torch.random.set_rng_state(rng)
    with torch.no_grad():
        coarse = probe(images, aux=True)[2]  # train mode: batch statistics, so the logits the objective saw
    assert sorted(coarse) == [8, 16]
    # each coarse logit over its stride x stride pixels; one term per head
    expected = sum(0.4 * F.cross_entropy(run.loss_fn.bound(F.interpolate(logits, scale_factor=stride)), masks)
                   for stride, logits in coarse.items())
    assert objective.item() - loss.item() == pytest.approx(expected.item(), rel=1e-4)
    torch.random.set_rng_state(rng)
    heads = {s: h.weight.detach().clone() for s, h in run.model.aux_heads.items()}
    row = T.train_step(run, images, masks, labels)
    assert row[0].item() == loss.item() and row[1].item() == parts["seg"].item()  # reported: no aux term
    assert int(row[4]) == 0  # accepted
    for stride, head in run.model.aux_heads.items():
        assert not torch.equal(heads[stride], head.weight), stride  # each aux term reached its head


@pytest.mark.parametrize("size, strides, weights, smoothing, ignore", [
    ((64, 64), (8,), None, 0.0, 255),
    ((50, 70), (32, 16, 8), [0.5, 2.0, 1.0, 3.0], 0.1, 255),
    ((33, 96), (16, 4), [1.0, 1.0, 4.0, 0.2], 0.0, 255),
    ((40, 40), (32, 16, 8), [0.5, 2.0, 1.0, 3.0], 0.1, 0)])
def test_the_aux_term_from_cell_counts_equals_the_cross_entropy_of_nearest_upsampled_logits(size, strides, weights,
                                                                                            smoothing, ignore):
    """aux() never upsamples: it weighs each coarse logit by the class counts of the stride x stride target
    pixels it covers (counted once at the finest stride, summed for the coarser ones). That must be the sum over
    the heads of F.cross_entropy of the logits repeated over those pixels, value and gradient, with class
    weights, label smoothing, ignored pixels (also an ignore_index that is one of the classes) and sizes that
    are no multiple of 32 (target padded)."""
    torch.manual_seed(0)
    height, width = size
    loss_fn = T.StableLoss(seg_class_weights=weights, label_smoothing=smoothing, aux_weight=0.4, ignore_index=ignore)
    coarse = {s: (torch.randn(3, 4, 32 // s * -(-height // 32), 32 // s * -(-width // 32)) * 10).requires_grad_()
              for s in strides}
    target = torch.randint(0, 4, (3, height, width))
    target[0, :5, :7] = ignore
    target[1, -9:, -3:] = ignore
    term = loss_fn.aux(coarse, target)
    reference = sum(0.4 * F.cross_entropy(loss_fn.bound(F.interpolate(logits, scale_factor=s)[..., :height, :width]),
                                          target, ignore_index=ignore, label_smoothing=smoothing,
                                          weight=None if weights is None else torch.tensor(weights))
                    for s, logits in coarse.items())
    assert term.item() == pytest.approx(reference.item(), rel=1e-6)
    grads = torch.autograd.grad(term, list(coarse.values()))
    grads_ref = torch.autograd.grad(reference, list(coarse.values()))
    for grad, grad_ref in zip(grads, grads_ref):
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
    assert {"aux_heads.8.weight", "aux_heads.16.weight"} <= after["model"].keys()


def test_the_guard_sees_a_non_finite_aux_term_that_the_reported_loss_does_not_show(make_run, monkeypatch):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    T.train_step(run, images, masks, labels)
    before = copy.deepcopy(T.training_state(run))
    monkeypatch.setattr(run.loss_fn, "aux", lambda logits, target: logits[8].sum() * float("nan"))
    row = T.train_step(run, images, masks, labels)
    assert torch.isfinite(row[0]) and T.SKIP_REASONS[int(row[4])] == "non-finite loss"
    undo_schedule_step(run)
    assert_same_training_state(before, T.training_state(run))


def test_a_checkpoint_with_aux_heads_evaluates_as_saved_and_names_the_setting_when_told_otherwise(tmp_path):
    run = tmp_path / "run"
    assert T.main(TINY + AUX + ["--epochs", "1", "--out-dir", str(run)]) == 0
    payload = T.load_checkpoint(run / "best.pt")
    assert "aux_heads.16.weight" in payload["model"] and payload["config"]["aux_weight"] == 0.4
    # its own setting applies (TINY's --aux-weight 0 is not given here)
    assert T.main(["--eval-only", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "eval")]) == 0
    with pytest.raises(T.CheckpointError, match=r"aux_weight=0.4.*aux_weight=0\.0.*leave --aux-weight out"):
        T.load_checkpoint(run / "best.pt", load_config(TINY))
    with pytest.raises(T.CheckpointError, match=r"aux_strides=\[16, 8\].*aux_strides=\[8\].*leave --aux-strides out"):
        T.load_checkpoint(run / "best.pt", load_config(TINY + ["--aux-weight", "0.4", "--aux-strides", "8"]))


def test_a_checkpoint_from_before_aux_strides_evaluates_and_resumes(tmp_path):
    """Written by commit 56fd460 and earlier: one head at stride 8 named aux_head, no aux_strides in its
    config. It loads as aux_strides [8] with the same weights, evaluates to its logged mIoU and resumes."""
    run = tmp_path / "run"
    assert T.main(TINY + ["--aux-weight", "0.4", "--aux-strides", "8", "--epochs", "1", "--out-dir", str(run)]) == 0
    payload = torch.load(run / "last.pt", weights_only=False)
    del payload["config"]["aux_strides"]
    for key in ("weight", "bias"):
        payload["model"][f"aux_head.{key}"] = payload["model"].pop(f"aux_heads.8.{key}")
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    loaded = T.load_checkpoint(old)
    assert loaded["config"]["aux_strides"] == [8] and "aux_head.weight" not in loaded["model"]
    assert torch.equal(loaded["model"]["aux_heads.8.weight"], payload["model"]["aux_head.weight"])
    assert T.main(["--eval-only", "--checkpoint", str(old), "--out", str(tmp_path / "eval")]) == 0
    logged = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["val_miou"])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]["val_miou"] == pytest.approx(logged, abs=1e-6)
    assert T.main(TINY + ["--aux-weight", "0.4", "--aux-strides", "8", "--epochs", "2", "--resume", str(old),
                          "--out-dir", str(tmp_path / "resumed")]) == 0


def test_a_checkpoint_from_before_stem_kernel_evaluates_as_its_3x3_stem_and_names_the_setting(tmp_path):
    """Written before STEM_KERNEL (a 3x3 stem, no stem_kernel in its config): it loads as stem_kernel 3,
    evaluates to its logged mIoU, and a run told another kernel is stopped with the key named."""
    run = tmp_path / "run"
    assert T.main(TINY + ["--stem-kernel", "3", "--epochs", "1", "--out-dir", str(run)]) == 0
    payload = torch.load(run / "best.pt", weights_only=False)
    del payload["config"]["stem_kernel"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert T.load_checkpoint(old)["config"]["stem_kernel"] == 3
    assert T.main(["--eval-only", "--checkpoint", str(old), "--out", str(tmp_path / "eval")]) == 0
    logged = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["val_miou"])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]["val_miou"] == pytest.approx(logged, abs=1e-6)
    with pytest.raises(T.CheckpointError, match=r"stem_kernel=3.*stem_kernel=7"):
        T.load_checkpoint(old, load_config(TINY))


def test_a_checkpoint_from_before_cls_pool_evaluates_as_its_mean_pooled_head_and_names_the_setting(tmp_path):
    """Written before CLS_POOL (the cls head read pooled means only, no cls_pool in its config): it loads as
    cls_pool avg whatever the default, evaluates to its logged accuracy, and a run told avgmax is stopped
    with the key named."""
    run = tmp_path / "run"
    assert T.main(TINY + ["--epochs", "1", "--out-dir", str(run)]) == 0  # TINY: --cls-pool avg
    payload = torch.load(run / "best.pt", weights_only=False)
    del payload["config"]["cls_pool"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert T.load_checkpoint(old)["config"]["cls_pool"] == "avg"
    assert T.main(["--eval-only", "--checkpoint", str(old), "--out", str(tmp_path / "eval")]) == 0
    logged = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["val_cls_acc"])
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]["val_cls_acc"] == pytest.approx(logged, abs=1e-6)
    with pytest.raises(T.CheckpointError, match=r"cls_pool='avg'.*cls_pool='avgmax'"):
        T.load_checkpoint(old, load_config([a for a in TINY if a not in ("--cls-pool", "avg")]))


def test_a_torchvision_backbone_checkpoint_from_before_stem_kernel_loads_under_todays_defaults(tmp_path):
    """stem_kernel (like width) shapes only the built-in encoder: an old resnet18 checkpoint upgraded to
    stem_kernel 3 is not refused by today's default of 7."""
    cfg = load_config(TINY + ["--backbone", "resnet18"])
    settings = cfg.to_dict()
    del settings["stem_kernel"]
    path = tmp_path / "old.pt"
    torch.save({"format": T.CHECKPOINT_FORMAT, "model": T.build_model(cfg).state_dict(), "config": settings}, path)
    assert T.load_checkpoint(path, cfg)["config"]["stem_kernel"] == 3


def test_diagnose_sends_the_gradient_through_the_aux_head(make_run):
    run = make_run(*AUX)
    images, masks, labels = first_batch(run)
    checks = D.check_gradients(run.model, images, masks, labels, run.loss_fn, run.cfg)
    flow = next(c for c in checks if c.name == "grad.flow")
    assert flow.status == "PASS", flow
