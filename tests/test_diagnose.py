"""diagnose_training.py: each deliberately broken setup FAILs and is named; a healthy one passes every check."""

import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

import diagnose_training as D
import train_enhanced_adaptivestream as T
from data import DataError
from config import load_config
from conftest import TINY

CPU = torch.device("cpu")
# TINY's 4-channel full-resolution decoder stage cannot memorise the overfit test's 4 samples to 90% in 200
# steps for some batches (85-89% measured at seeds 0/1); with --decoder-channels 16 (the default) and width 8,
# seeds 0-7 all reach 90% within 32-52 steps (measured at 32x32).
# 64 px, not TINY's 32: at 32 px the bottleneck is 1x1 (BatchNorm over 4 values) and the healthy run's
# gradients passed skip_grad_norm in 3 steps.
HEALTHY = TINY + ["--width", "8", "--decoder-channels", "16", "--stream-channels", "32", "--image-size", "64"]


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory):
    """A real tiny training run: its folder (metrics.csv, steps.jsonl, train.log, config.yaml, last.pt)."""
    run = tmp_path_factory.mktemp("healthy") / "run"
    # 96 train / 32 val images, 8 epochs: both heads clear the verdict's bar (with 64 images the residual encoder
    # memorised them: train cls acc 0.69-0.75, val 0.44-0.50). With the Dice term, 128 images for 6 epochs left cls
    # at 0.50 against a bar of 0.55; 96 for 8 end at mIoU 0.64, cls 0.69 (baselines 0.21, 0.38). A higher LR
    # instead trips diagnose's update-ratio check.
    assert T.main(HEALTHY + ["--out-dir", str(run), "--bn-recalibrate", "2", "--epochs", "8", "--base-lr", "1e-3",
                             "--cls-weight", "1", "--synthetic-train-size", "96", "--synthetic-val-size", "32",
                             "--vis-every", "0", "--hflip", "0.5"]) == 0
    return run


def tiny_batch(cfg):
    """(images, masks, labels) of the first real training batch, as the loop moves them."""
    setup = D.build_setup(cfg, CPU)
    return D.batch_tensors(setup.batch, cfg, CPU), setup


def statuses(checks):
    return {c.name: c.status for c in checks}


def by_name(checks, name):
    (check,) = [c for c in checks if c.name == name]
    return check


# ---- the real CLI: healthy exits 0, a broken checkpoint exits 1, bad input exits 2 ----
def test_healthy_setup_passes_every_check_and_exits_0(healthy_run, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = D.main(HEALTHY + ["--run", str(healthy_run), "--checkpoint", str(healthy_run / "last.pt"),
                          "--json", str(report)])
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert code == 0, out
    assert data["exit_code"] == 0 and data["mode"] == "full"
    assert {c["status"] for c in data["checks"]} == {"PASS"}, out
    names = {c["name"] for c in data["checks"]}
    for name in ("config.warmup", "data.decode", "batch.mask_values", "model.seg_size", "loss.init_seg",
                 "grad.flow", "update.ratio", "lr.schedule", "nan.float32.forward", "nan.float32.backward",
                 "overfit", "input_dependence", "checkpoint.finite", "checkpoint.compatible", "bn.health",
                 "run.skipped", "run.outcome", "run.loss_trend"):
        assert name in names
    assert data["root_causes"] == []
    assert "every check passed" in out


def test_cli_with_a_nan_checkpoint_exits_1_and_ranks_the_weights_first(healthy_run, tmp_path, capsys):
    payload = torch.load(healthy_run / "last.pt", weights_only=True)
    payload["model"]["seg_head.weight"].view(-1)[:3] = float("nan")
    payload["model"]["seg_head.weight"].view(-1)[3] = float("inf")
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    report = tmp_path / "report.json"
    assert D.main(HEALTHY + ["--quick", "--checkpoint", str(bad), "--json", str(report)]) == 1
    data = json.loads(report.read_text())
    check = next(c for c in data["checks"] if c["name"] == "checkpoint.finite")
    assert check["status"] == "FAIL"
    assert check["details"]["nonfinite"] == ["model.seg_head.weight (3 NaN, 1 Inf)"]
    assert data["root_causes"][0]["cause"] == "weights"
    assert "FAIL  checkpoint.finite" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--bacth-size", "4"], "unknown flag --bacth-size (did you mean '--batch-size'?)"),
    (["--quik"], "unknown flag --quik (did you mean '--quick'?)"),  # the script's own flags are suggested too
    (["--checkpoint", "missing.pt"], "--checkpoint: checkpoint missing.pt does not exist"),
    (["--run", "no_such_folder"], "--run: no_such_folder is not a folder"),
    (["--batch", "notes.txt"], "--batch: bad-batch file notes.txt cannot be read"),
    (["--json", "no/such/dir/r.json"], "--json: folder no/such/dir does not exist"),
    (["--quick", "--min-lr", "1"], "min_lr"),
])
def test_bad_arguments_and_unreadable_files_exit_2_naming_them(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a batch")
    assert D.main(TINY + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---- model and loss ----
class Downsampled(nn.Module):
    """The real model with a decoder that stops early: 32x32 segmentation logits for any input."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        seg, cls = self.model(x)
        return nn.functional.adaptive_avg_pool2d(seg, 32), cls


def test_decoder_output_smaller_than_the_target_fails_and_the_loss_never_reports_success():
    cfg = load_config(TINY + ["--image-size", "224", "--batch-size", "2", "--synthetic-train-size", "2"])
    (images, masks, labels), _ = tiny_batch(cfg)
    model = Downsampled(T.build_model(cfg))
    out = D.Reporter()
    assert D.diagnose_model(model, (images, masks, labels), cfg, out) is False
    seg_size = by_name(out.checks, "model.seg_size")
    assert seg_size.status == "FAIL" and seg_size.value == "seg logits 32x32, target 224x224"
    loss = by_name(out.checks, "loss.init")
    assert loss.status == "FAIL" and "(2, 4, 32, 32)" in loss.value and "(2, 224, 224)" in loss.value
    assert not any(c.status == "PASS" and c.name.startswith(("loss", "grad", "update")) for c in out.checks)
    assert statuses(out.checks)["grad"] == "SKIP"


class EqualLogits(nn.Module):
    """A model that has learned nothing: every class and label equally likely everywhere."""

    def __init__(self, seg_classes: int, cls_classes: int):
        super().__init__()
        self.seg_classes, self.cls_classes = seg_classes, cls_classes

    def forward(self, x):
        return x.new_zeros(x.shape[0], self.seg_classes, *x.shape[2:]), x.new_zeros(x.shape[0], self.cls_classes)


def test_initial_loss_of_equal_logits_is_exactly_the_uniform_guess_with_ignored_pixels():
    # The seg expectation is ln(S) + dice_weight x the Dice of equal logits on the batch's scored pixels: a
    # model that predicts nothing must land on it (+0%), ignored pixels (255) left out of the counts.
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    masks = masks.clone()
    masks[:, :5] = 255
    checks = D.check_initial_loss(EqualLogits(4, 3), images, masks, labels, T.build_loss(cfg), cfg)
    seg = by_name(checks, "loss.init_seg")
    assert seg.status == "PASS" and ("(+0%)" in seg.value or "(-0%)" in seg.value) and "ln(4) + dice" in seg.value, seg.value


def test_unused_parameter_is_named_by_grad_flow():
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    model = T.build_model(cfg)
    model.unused = nn.Linear(3, 3)
    checks = D.check_gradients(model, images, masks, labels, T.build_loss(cfg), cfg)
    flow = by_name(checks, "grad.flow")
    assert flow.status == "FAIL" and flow.details["none"] == ["unused.weight", "unused.bias"]


# ---- data ----
class BinaryMasks(torch.utils.data.Dataset):
    """Two-class masks saved as 0/255 (the classic binary-PNG mistake); sample 1 is an unreadable file."""

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 1:
            raise DataError("image data/images/b.jpg is truncated")
        mask = torch.zeros(8, 8, dtype=torch.uint8)
        mask[2:6, 2:6] = 255
        return {"image": torch.randn(3, 8, 8), "mask": mask, "label": 0, "id": f"data/images/{index}.jpg"}


@pytest.mark.parametrize("ignore_index", [255, -100])
def test_masks_stored_as_0_255_with_2_classes_fail_with_the_hint(ignore_index):
    cfg = load_config(TINY + ["--num-seg-classes", "2", "--num-cls-classes", "2", "--ignore-index", str(ignore_index)])
    checks = D.check_data({"train": BinaryMasks()}, cfg, None)
    values = by_name(checks, "data.mask_values")
    assert values.status == "FAIL" and "masks look like 0/255" in values.fix
    decode = by_name(checks, "data.decode")
    assert decode.status == "FAIL" and "data/images/b.jpg is truncated" in decode.fix
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.stack([BinaryMasks()[0]["mask"]] * 2),
             "label": torch.tensor([0, 1]), "id": ["a", "b"]}
    values = by_name(D.check_batch(batch, cfg), "batch.mask_values")
    assert values.status == "FAIL" and "masks look like 0/255" in values.fix


def test_many_distinct_mask_values_point_at_jpeg_artefacts_and_float_masks_fail():
    cfg = load_config(TINY)
    jpeg = Counter({v: 10 for v in range(40)})
    check = D.judge_mask_values("data.mask_values", jpeg, cfg)
    assert check.status == "FAIL" and "JPEG artefacts" in check.fix
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.rand(2, 8, 8) * 3, "label": torch.tensor([0, 1])}
    assert by_name(D.check_batch(batch, cfg), "batch.mask_dtype").status == "FAIL"


def test_raw_0_255_images_fail_normalisation_and_nan_pixels_fail_finite():
    cfg = load_config(TINY)
    images = torch.rand(2, 3, 8, 8) * 255
    images[0, 0, 0, 0] = float("nan")
    batch = {"image": images, "mask": torch.zeros(2, 8, 8, dtype=torch.long), "label": torch.tensor([0, 1])}
    checks = D.check_batch(batch, cfg)
    assert by_name(checks, "batch.finite").value == "1 non-finite values"
    assert by_name(checks, "batch.finite").status == "FAIL"
    # the NaN pixel makes the stats NaN; without it, raw 0-255 images are a FAIL with the ToDtype hint
    images[0, 0, 0, 0] = 0
    norm = by_name(D.check_batch(batch, cfg), "batch.normalisation")
    assert norm.status == "FAIL" and "raw 0-255" in norm.fix


# ---- NaN / Inf source finder ----
class Log(nn.Module):
    """log of a ReLU output: -inf wherever the input is exactly 0."""

    def forward(self, x):
        return torch.log(x)


class Sqrt(nn.Module):
    """Finite forward; the backward of sqrt at 0 is Inf."""

    def forward(self, x):
        return torch.sqrt(x)


@pytest.mark.parametrize("layer, direction", [(Log, "forward"), (Sqrt, "backward")])
def test_nan_finder_names_the_inserted_layer_not_a_later_one(layer, direction):
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    model = T.build_model(cfg)
    model.encoder.stages[2] = nn.Sequential(model.encoder.stages[2], layer())  # middle of the encoder
    report = D.find_nonfinite(model, images, masks, labels, T.build_loss(cfg))
    producer = report.forward_producer if direction == "forward" else report.backward_producer
    assert producer == "encoder.stages.2.1"
    if direction == "backward":
        assert report.forward_producer is None and math.isfinite(report.loss)
    checks = D.check_nonfinite(report, "nan")
    check = by_name(checks, f"nan.float32.{direction}")
    assert check.status == "FAIL" and "encoder.stages.2.1" in check.value
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # the finder puts them back


def test_fp16_overflow_is_named_in_float32_and_found_under_fp16_autocast():
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    model = T.build_model(cfg)
    with torch.no_grad():
        model.encoder.stages[0][0][0].weight.mul_(1e6)  # conv outputs ~1e6: fine in float32, Inf in float16
    loss_fn = T.build_loss(cfg)
    fp32 = D.find_nonfinite(model, images, masks, labels, loss_fn)
    assert fp32.forward_producer is None
    assert fp32.fp16_overflow[0].startswith("encoder.stages.0.0.0 ")
    fp16 = D.find_nonfinite(model, images, masks, labels, loss_fn, "fp16")
    assert fp16.forward_producer == "encoder.stages.0.0.0"


# ---- LR schedule ----
def test_schedule_without_a_floor_fails_below_min_lr_and_the_real_one_passes():
    cfg = load_config(["--device", "cpu"])  # 12 epochs; 96 steps per epoch at the default 768 images / batch 8
    no_floor = lambda cfg_, optimizer, steps: torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    (check,) = D.check_lr_schedule(cfg, 96, make_scheduler=no_floor)
    # 1e-3 * 0.95**k < 1e-6 first at k = 135; < 1e-9 first at k = 270
    assert check.status == "FAIL"
    assert "below min_lr from step 135" in check.value and "~0 (< 1e-09) from step 270" in check.value
    (real,) = D.check_lr_schedule(cfg, 96)
    assert real.status == "PASS" and real.details["warmup_end"] == 95
    assert real.details["min"] == pytest.approx(1e-6) and real.details["max"] == pytest.approx(1e-3)


# ---- BatchNorm ----
def test_poisoned_batchnorm_statistics_fail_and_the_layer_is_named(healthy_run):
    cfg = load_config(HEALTHY)
    _, setup = tiny_batch(cfg)
    batches = [D.batch_tensors(b, cfg, CPU) for b in setup.loader]  # 4 batches of 4
    model = T.build_model(cfg)
    model.load_state_dict(T.load_checkpoint(healthy_run / "last.pt", cfg)["model"])  # trained, recalibrated
    loss_fn = T.build_loss(cfg)
    healthy = D.check_batchnorm(model, batches, loss_fn, cfg)[0]
    assert healthy.status == "PASS", healthy.value
    model.encoder.stages[1][1][1].running_var.mul_(1e-4)  # poisoned: every activation of the layer x100 in eval
    (check,) = D.check_batchnorm(model, batches, loss_fn, cfg, setup.loader)
    assert check.status == "FAIL"
    assert max(check.details["distances"], key=check.details["distances"].get) == "encoder.stages.1.1.1"
    assert "furthest: encoder.stages.1.1.1 (" in check.value
    assert "--bn-recalibrate" in check.fix and "after recalibrating" in check.fix


# ---- run folder ----
def test_run_folder_with_every_step_skipped_fails_run_skipped(tmp_path):
    run = tmp_path / "run"
    argv = TINY + ["--out-dir", str(run), "--skip-grad-norm", "1e-9", "--max-skip-fraction", "1.0",
                   "--epochs", "1", "--warmup-epochs", "0"]
    assert T.main(argv) == 0  # max_skip_fraction 1.0 lets it finish with nothing learnt
    checks = D.check_run(D.read_run_folder(run), load_config(argv))
    skipped = by_name(checks, "run.skipped")
    assert skipped.status == "FAIL"
    assert skipped.value == "epoch 1: 4/4 (100%); gradient explosion x4"
    assert skipped.details["per_epoch"] == {1: 1.0}
    assert by_name(checks, "run.outcome").status == "PASS"  # it did finish: the skips are the failure


def test_run_that_stopped_on_skipped_steps_fails_outcome_and_metrics(tmp_path):
    run = tmp_path / "run"
    argv = TINY + ["--out-dir", str(run), "--skip-grad-norm", "1e-9", "--epochs", "1", "--warmup-epochs", "0"]
    assert T.main(argv) == 1  # more than max_skip_fraction 0.25 of the epoch skipped: stopped, no metrics row
    checks = D.check_run(D.read_run_folder(run), load_config(argv))
    outcome = by_name(checks, "run.outcome")
    assert outcome.status == "FAIL" and outcome.value.startswith("failed after 0 epoch(s), step 2: 2 of 4 steps in epoch 1 were skipped")
    # The same count as the outcome: skipped steps of the epoch's length (4), not of the steps run before the abort
    assert by_name(checks, "run.skipped").value == "epoch 1: 2/4 (50%); gradient explosion x2"
    assert by_name(checks, "run.metrics").status == "FAIL"


@pytest.mark.parametrize("error,failure,fix", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory", "lower batch_size"),
    (ZeroDivisionError("a bug"), "crash", "its traceback is in the terminal"),
])
def test_a_run_that_ran_out_of_memory_or_crashed_gets_its_own_fix(tmp_path, monkeypatch, error, failure, fix):
    real_step = T.train_step

    def step(run, *batch):
        if run.state.step == 2:
            raise error
        return real_step(run, *batch)

    monkeypatch.setattr(T, "train_step", step)
    run = tmp_path / "run"
    argv = TINY + ["--out-dir", str(run)]
    if failure == "crash":
        with pytest.raises(ZeroDivisionError):  # a crash keeps its traceback
            T.main(argv)
    else:
        assert T.main(argv) == 1
    outcome = by_name(D.check_run(D.read_run_folder(run), load_config(argv)), "run.outcome")
    assert outcome.status == "FAIL" and "step 2: " in outcome.value
    assert outcome.fix == D.FAILURE_FIXES[failure] and fix in outcome.fix


# ---- bad batch replay ----
def save_batch(tmp_path, cfg, model, amp="off", poison_image=False):
    setup = D.build_setup(cfg, CPU)
    batch = dict(setup.batch)
    if poison_image:
        batch["image"] = batch["image"].clone()
        batch["image"][1, 0, 4, 4] = float("nan")
    path = tmp_path / "bad_batches" / "step_7.pt"
    T.save_bad_batch(path, batch, step=7, epoch=1, reason="non-finite loss", loss=math.nan, grad_norm=math.nan,
                     lr=1e-3, amp=amp, model=model, weights_step=6, cfg=cfg)
    return D.read_bad_batch(path)


@pytest.mark.parametrize("case, cause", [("data", "data"), ("weights", "weights"), ("fp16", "numerics")])
def test_bad_batch_replay_tells_data_weights_and_numerics_apart(tmp_path, case, cause):
    cfg = load_config(TINY)
    model = T.build_model(cfg)
    with torch.no_grad():
        if case == "weights":
            model.decoder[1].up[0].weight[0, 0, 0, 0] = float("nan")
        if case == "fp16":
            model.encoder.stages[0][0][0].weight.mul_(1e6)
    payload = save_batch(tmp_path, cfg, model, amp="fp16" if case == "fp16" else "off", poison_image=case == "data")
    checks = D.check_bad_batch(payload, cfg, CPU)
    verdict = by_name(checks, "bad_batch.verdict")
    assert verdict.status == "FAIL" and verdict.cause == cause
    if case == "data":
        assert by_name(checks, "bad_batch.finite").status == "FAIL" and "train/" in verdict.fix
    if case == "weights":
        assert "decoder.1.up.0.weight (1 NaN, 0 Inf)" in verdict.value
    if case == "fp16":
        assert verdict.value.startswith("numerics: finite in float32, not in float16")
        assert by_name(checks, "bad_batch.nan.float32.forward").status == "PASS"


@pytest.mark.parametrize("given", [[], ["--config", "other.yaml"]])
def test_a_bad_batch_is_replayed_with_its_runs_config_unless_config_is_given(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "bad_batches").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("image_size: 48\n")
    (tmp_path / "other.yaml").write_text("image_size: 40\n")
    options, cfg = D.parse_args(["--batch", "run/bad_batches/step_7.pt", *given])
    assert cfg.image_size == (40 if given else 48)
    assert options.run_config == (None if given else "run/config.yaml")


# ---- summary ----
def test_root_causes_rank_fail_before_warn_and_upstream_before_downstream():
    checks = [D.judge("run.skipped", False, "", "", "fix run", "run"),
              D.judge("update.ratio", False, "", "", "fix lr", "lr", warn=True),
              D.judge("batch.mask_values", False, "", "", "fix data", "data"),
              D.judge("model.forward", True, "", "", "", "architecture")]
    ranked = D.ranked_causes(checks)
    assert [(r["cause"], r["status"], r["fix"]) for r in ranked] == [
        ("data", "FAIL", "fix data"), ("run", "FAIL", "fix run"), ("lr", "WARN", "fix lr")]


# ---- FAIL sides of checks that a healthy setup passes ----
def test_targets_no_image_feature_predicts_fail_overfit():
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    same = images[:1].expand(4, -1, -1, -1).contiguous()  # one image four times, four different targets
    noise = torch.randint(0, cfg.num_seg_classes, (4, *masks.shape[1:]), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % cfg.num_cls_classes
    model = T.build_model(cfg)
    (check,), _ = D.check_overfit(model, same, noise, labels, T.build_loss(cfg), cfg, max_steps=20)
    assert check.status == "FAIL" and check.cause == "learning"
    assert len(check.details["losses"]) == 20


class IgnoresInput(nn.Module):
    """The real model fed zeros whatever it is given: its predictions cannot depend on the image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.zeros_like(x))


def test_a_model_that_ignores_its_input_fails_input_dependence():
    cfg = load_config(TINY)
    (images, masks, labels), _ = tiny_batch(cfg)
    (check,) = D.check_input_dependence(IgnoresInput(T.build_model(cfg)), images, masks, labels, T.build_loss(cfg))
    assert check.status == "FAIL" and check.value.endswith("(x1)")


@pytest.mark.parametrize("base_lr, min_lr, found", [("1", "1e-6", "too large"), ("1e-9", "1e-12", "too small")])
def test_a_learning_rate_far_off_warns_update_ratio(base_lr, min_lr, found):
    cfg = load_config(TINY + ["--base-lr", base_lr, "--min-lr", min_lr])
    (images, masks, labels), _ = tiny_batch(cfg)
    (check,) = D.check_update_ratio(T.build_model(cfg), images, masks, labels, T.build_loss(cfg), cfg)
    assert check.status == "WARN" and check.cause == "lr" and f"; {found}: " in check.value


def test_update_ratio_does_not_blame_the_learning_rate_for_a_head_initialised_small_on_purpose():
    """Adam moves each element of the small-init cls head by ~lr: 4 lr sqrt(fan-in) of its scale, 0.14 here
    (the default model: 0.106 at lr 1e-3), while every other layer moves by less than 0.1."""
    cfg = load_config(TINY + ["--cls-pool", "avgmax", "--base-lr", "3e-3"])
    (images, masks, labels), _ = tiny_batch(cfg)
    (check,) = D.check_update_ratio(T.build_model(cfg), images, masks, labels, T.build_loss(cfg), cfg)
    assert check.status == "PASS", check.value
    assert "by design (heads initialised small): cls_head.1.weight" in check.value


def test_an_ordinary_gradient_above_skip_grad_norm_fails_grad_norm_and_names_the_setting():
    cfg = load_config(TINY + ["--skip-grad-norm", "1e-6"])
    (images, masks, labels), _ = tiny_batch(cfg)
    checks = D.check_gradients(T.build_model(cfg), images, masks, labels, T.build_loss(cfg), cfg)
    norm = by_name(checks, "grad.norm")
    assert norm.status == "FAIL" and norm.cause == "config" and "raise --skip-grad-norm" in norm.fix


def test_a_checkpoint_of_another_width_fails_checkpoint_compatible(tmp_path):
    cfg, other = load_config(TINY), load_config(TINY + ["--width", "8"])
    payload = {"format": T.CHECKPOINT_FORMAT, "model": T.build_model(other).state_dict(), "config": vars(other),
               "state": {}}
    checks, usable = D.check_checkpoint(payload, tmp_path / "other.pt", cfg)
    compatible = by_name(checks, "checkpoint.compatible")
    assert compatible.status == "FAIL" and "size mismatch" in compatible.value and not usable
    assert by_name(checks, "checkpoint.finite").status == "PASS"


def test_a_checkpoint_of_an_earlier_model_layout_is_named_as_such(tmp_path):
    cfg = load_config(TINY)
    model = {k: v for k, v in T.build_model(cfg).state_dict().items() if not k.startswith("encoder.stages.1.2.")}
    payload = {"format": T.CHECKPOINT_FORMAT, "model": model, "config": vars(cfg), "state": {}}
    checks, usable = D.check_checkpoint(payload, tmp_path / "old.pt", cfg)
    compatible = by_name(checks, "checkpoint.compatible")
    assert compatible.status == "FAIL" and "written by an earlier version" in compatible.value and not usable
    assert "Missing key" not in compatible.value


def metrics_row(epoch, train_loss):
    return {"epoch": str(epoch), "lr": "1e-3", "train_loss": str(train_loss), "val_loss": "1.0", "val_miou": "0.3",
            "val_cls_acc": "0.5"}


def test_a_train_loss_that_rises_fails_run_loss_trend():
    rising = D.check_run_metrics([metrics_row(1, 1.0), metrics_row(2, 1.2)], 1e-6)
    trend = by_name(rising, "run.loss_trend")
    assert trend.status == "FAIL" and trend.value == "train loss 1.0000 (epoch 1) -> 1.2000 (epoch 2)"
    level = D.check_run_metrics([metrics_row(1, 1.0), metrics_row(2, 1.1)], 1e-6)  # exactly the allowed 10% rise
    assert by_name(level, "run.loss_trend").status == "PASS"


@pytest.mark.parametrize("extra, train_size, steps, name, status", [
    (["--base-lr", "0.5"], 16, 4, "config.base_lr", "WARN"),
    (["--min-lr", "1e-12"], 16, 4, "config.min_lr", "FAIL"),
    (["--batch-size", "2"], 16, 8, "config.batch_size", "WARN"),
    (["--epochs", "4", "--warmup-epochs", "2"], 16, 4, "config.warmup", "WARN"),  # 8 of 16 steps
    ([], 3, 0, "config.dataset_size", "FAIL"),  # fewer images than one batch of 4 (and so no step to warm up in)
    ([], 11, 2, "config.dataset_size", "WARN"),  # 3 of 11 images dropped per epoch
])
def test_settings_that_cannot_work_are_flagged_by_config_checks(extra, train_size, steps, name, status):
    cfg = load_config(TINY + extra)
    checks = D.check_config(cfg, train_size, steps)
    assert by_name(checks, name).status == status
    others = {"config.warmup"} if steps == 0 else set()
    assert {c.name for c in checks if c.status != "PASS"} == {name} | others
