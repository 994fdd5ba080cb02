"""Finished is not learned: baselines of the data, the end-of-run verdict, its exit code, and what diagnose says."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import diagnose_training as D
import results
import train_enhanced_adaptivestream as T
from config import load_config
from conftest import TINY
from data import Baselines, dataset_stats, majority_scores, uniform_dice
from fake_data import make_utkface_folder

# TINY without --no-require-learning: the verdict sets the exit code.
JUDGED = [a for a in TINY if a != "--no-require-learning"]
BASELINES = Baselines(cls_chance=1 / 3, cls_majority=0.5, seg_majority_miou=0.2, seg_majority_pixel_acc=0.8,
                      seg_uniform_loss=math.log(4), cls_uniform_loss=math.log(3),
                      uniform_loss=math.log(4) + 0.5 * math.log(3), val_images=100)


def row(epoch, *, seg_loss=0.5, cls_loss=0.5, miou=0.8, val_acc=0.9, train_acc=0.9, val_seg_loss=0.5):
    return {"epoch": epoch, "train_loss": seg_loss + 0.5 * cls_loss, "train_seg_loss": seg_loss,
            "train_cls_loss": cls_loss, "train_cls_acc": train_acc, "val_miou": miou, "val_cls_acc": val_acc,
            "val_seg_loss": val_seg_loss, "val_cls_loss": cls_loss}


def end_event(run: Path) -> dict:
    events = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end"  # the end event is the last record
    return events[-1]


# ---- baselines ----
def test_majority_scores_are_the_best_constant_guess_with_miou_over_classes_present():
    miou, acc = majority_scores(np.array([80, 20, 0]))  # val: 80 px of class 0, 20 of class 1, none of class 2
    assert acc == 0.8 and miou == 0.8 / 2  # IoU(0) = 80/100, IoU(1) = 0, class 2 absent from both
    miou, acc = majority_scores(np.array([30, 60, 10]))  # the most frequent val class, whatever train says
    assert acc == 0.6 and miou == pytest.approx(0.6 / 3)


def test_data_summary_logs_the_baselines(make_run, caplog):
    caplog.set_level("INFO", logger="adaptivestream")
    T.log.addHandler(caplog.handler)
    try:
        run = make_run()
    finally:
        T.log.removeHandler(caplog.handler)
    b = run.baselines
    val_pixels = dataset_stats(run.val_loader.dataset.dataset, run.cfg, sample=None)[0].pixel_counts
    seg_uniform = math.log(4) + run.cfg.dice_weight * uniform_dice(val_pixels)
    assert run.cfg.dice_weight > 0 and b.seg_uniform_loss == pytest.approx(seg_uniform)
    assert b.cls_chance == pytest.approx(1 / 3) and b.uniform_loss == pytest.approx(seg_uniform + 0.5 * math.log(3))
    assert b.val_images == 8
    assert f"mIoU {b.seg_majority_miou:.4f} (majority class everywhere" in caplog.text


# ---- the verdict rules ----
def test_a_head_that_clears_its_baseline_learned():
    cfg = load_config(TINY)
    verdicts = T.judge_learning([row(1), row(2)], BASELINES, cfg)
    assert {h: v.verdict for h, v in verdicts.items()} == {"seg": "learned", "cls": "learned"}


def test_val_metric_within_the_margin_of_the_baseline_did_not_learn():
    cfg = load_config(TINY)
    bar = 0.2 + T.LEARNED_MARGIN * 0.8
    rows = [row(1, miou=bar - 1e-3, seg_loss=1.3), row(2, miou=bar - 1e-3, seg_loss=1.3)]
    seg = T.judge_learning(rows, BASELINES, cfg)["seg"]
    assert seg.verdict == "did not learn" and seg.kind == "no_signal"
    rows[-1]["val_miou"] = bar
    assert T.judge_learning(rows, BASELINES, cfg)["seg"].verdict == "learned"


def test_an_accuracy_gain_within_two_standard_errors_of_the_val_set_is_not_learned():
    cfg = load_config(TINY)
    rows = [row(1, val_acc=0.7), row(2, val_acc=0.7)]  # cls baseline 0.5: 2 standard errors on 8 images = 0.35
    few = dataclasses.replace(BASELINES, val_images=8)
    assert T.judge_learning(rows, few, cfg)["cls"].verdict != "learned"
    assert T.judge_learning(rows, BASELINES, cfg)["cls"].verdict == "learned"  # 100 images: 0.1


def test_a_loss_above_the_uniform_guess_blames_the_learning_rate():
    cfg = load_config(TINY + ["--base-lr", "10"])
    rows = [row(1, seg_loss=3.0, miou=0.2), row(2, seg_loss=9.4, miou=0.2)]
    seg = T.judge_learning(rows, BASELINES, cfg)["seg"]
    assert seg.verdict == "did not learn" and seg.kind == "lr"
    assert "learning rate is too high (base_lr 10)" in seg.cause


def test_a_train_loss_never_below_uniform_after_warmup_did_not_learn_even_when_val_looks_good():
    cfg = load_config(TINY)
    rows = [row(1, seg_loss=1.5), row(2, seg_loss=1.4)]  # ln 4 = 1.386
    assert T.judge_learning(rows, BASELINES, cfg)["seg"].verdict == "did not learn"


def test_a_loss_that_stays_at_the_uniform_guess_is_not_blamed_on_the_learning_rate():
    cfg = load_config(TINY)
    rows = [row(1, seg_loss=1.40, miou=0.2), row(2, seg_loss=1.40, miou=0.2)]  # ln 4 = 1.386: a head with no gradient
    seg = T.judge_learning(rows, BASELINES, cfg)["seg"]
    assert seg.verdict == "did not learn" and seg.kind == "no_signal"


def test_a_falling_loss_says_too_few_steps():
    cfg = load_config(TINY)
    rows = [row(1, cls_loss=1.05, val_acc=0.5, train_acc=0.5), row(2, cls_loss=0.95, val_acc=0.5, train_acc=0.55)]
    cls = T.judge_learning(rows, BASELINES, cfg)["cls"]
    assert cls.verdict == "did not learn" and cls.kind == "too_few_steps" and "--epochs" in cls.cause


def test_high_train_accuracy_with_val_at_the_baseline_is_memorising():
    cfg = load_config(TINY)
    rows = [row(1, val_acc=0.5, train_acc=0.6), row(2, val_acc=0.5, train_acc=0.98)]
    cls = T.judge_learning(rows, BASELINES, cfg)["cls"]
    assert cls.verdict == "memorising" and "train cls acc 0.9800" in cls.cause


def test_a_head_with_weight_zero_is_not_judged():
    cfg = load_config(TINY + ["--cls-weight", "0"])
    assert T.judge_learning([row(1, val_acc=0.0)], BASELINES, cfg)["cls"].verdict == "not trained"


# ---- end to end: exit codes, the end event, diagnose ----
@pytest.fixture(scope="module")
def high_lr_run(tmp_path_factory):
    """An LR so high that the loss rises above a uniform guess: finished, did not learn."""
    run = tmp_path_factory.mktemp("lr") / "run"
    argv = JUDGED + ["--out-dir", str(run), "--base-lr", "100", "--warmup-epochs", "0", "--vis-every", "0",
                     "--skip-grad-norm", "1e9", "--epochs", "3"]
    return run, argv, T.main(argv)


def test_a_run_whose_loss_rose_ends_did_not_learn_with_exit_1(high_lr_run, capsys):
    run, _, code = high_lr_run
    assert code == 1
    end = end_event(run)
    assert end["outcome"] == "finished" and end["exit_code"] == 1 and end["learned"] is False
    assert end["verdict"]["seg"]["verdict"] == "did not learn" and end["verdict"]["seg"]["kind"] == "lr"
    assert end["baselines"]["seg_uniform_loss"] > math.log(4)  # the Dice of a uniform guess is in it
    assert end["baselines"]["uniform_loss"] == pytest.approx(end["baselines"]["seg_uniform_loss"] + 0.5 * math.log(3))
    log = (run / "train.log").read_text()
    assert "did not learn: seg head did not learn" in log and f"diagnose_training.py --run {run}" in log
    assert "is above the loss of a uniform guess" in log  # the per-epoch WARN line


def test_diagnose_fails_a_run_whose_loss_rose_and_ranks_the_learning_rate_first(high_lr_run, capsys):
    run, argv, _ = high_lr_run
    code = D.main(["--run", str(run), "--quick"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL  run.learned" in out and "FAIL  run.loss_vs_uniform" in out
    assert "every check passed" not in out
    first = out.split("Likely root causes, most likely first:")[1].splitlines()[1]
    assert "the learning rate or its schedule" in first


def test_require_learning_off_logs_the_verdict_and_exits_0(tmp_path):
    run = tmp_path / "run"
    assert T.main(TINY + ["--out-dir", str(run), "--vis-every", "0"]) == 0  # TINY has --no-require-learning
    end = end_event(run)
    assert end["exit_code"] == 0 and end["learned"] is False and "did not learn" in end["reason"]


@pytest.fixture
def memorising_run(tmp_path):
    """The run folder of a run that memorised: train cls acc 0.98, val at the majority baseline.

    Written by hand (metrics.csv rows and the end event's baselines, as the training script writes them):
    a tiny real run does not memorise within a test's budget (tried: 40 epochs of 12 random-label images).
    """
    run = tmp_path / "run"
    run.mkdir()
    rows = [row(e, val_acc=0.5, train_acc=t, cls_loss=c) for e, t, c in ((1, 0.6, 0.7), (2, 0.9, 0.3), (3, 0.98, 0.1))]
    for r in rows:
        r.update(lr=1e-3, skipped_steps=0, rollbacks=0, val_loss=1.0, val_pixel_acc=0.9, val_cls_f1=0.4, seconds=1.0)
        results.write_metrics_row(run / "metrics.csv", r)
    end = {"event": "end", "outcome": "finished", "reason": "memorising", "exit_code": 1, "epochs_done": 3,
           "step": 30, "baselines": dataclasses.asdict(BASELINES)}
    (run / "steps.jsonl").write_text(json.dumps({"event": "log", "epoch": 2, "step": 30}) + "\n" + json.dumps(end))
    (run / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in load_config(TINY).to_dict().items()}))
    return run


def test_diagnose_fails_a_memorising_run_and_ranks_generalization_first(memorising_run, capsys):
    code = D.main(["--run", str(memorising_run), "--quick"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL  run.learned" in out and "cls memorising" in out and "FAIL  run.generalization" in out
    assert "every check passed" not in out
    first = out.split("Likely root causes, most likely first:")[1].splitlines()[1]
    assert "memorises the training set" in first


def test_one_epoch_with_every_other_setting_default_runs(tmp_path, caplog):
    run = tmp_path / "run"
    argv = [a for a in TINY if a not in ("--warmup-epochs", "0.5")] + ["--epochs", "1", "--out-dir", str(run)]
    assert "--warmup-epochs" not in argv  # the default warm-up (1 epoch) is as long as the run
    assert T.main(argv) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch
    assert "warm-up shortened to 0.5 epochs" in (run / "train.log").read_text()


def test_a_mask_holding_only_ignore_index_among_class_masks_is_named_in_a_warning(tmp_path, caplog):
    paths = make_utkface_folder(tmp_path / "utk", count=10)
    odd = tmp_path / "utk" / "masks" / f"{paths[3].stem}_mask.png"
    mask = np.array(Image.open(odd))
    Image.fromarray((mask * 255).astype(np.uint8)).save(odd)  # 0/255 among 0/1 masks
    mostly = tmp_path / "utk" / "masks" / f"{paths[5].stem}_mask.png"
    Image.fromarray(np.full_like(mask, 255)).save(mostly)  # all of it ignore_index
    caplog.set_level("WARNING", logger="adaptivestream")
    T.log.addHandler(caplog.handler)
    try:
        cfg = load_config(TINY + ["--dataset", "folder", "--data-root", str(tmp_path / "utk"), "--num-seg-classes",
                                  "2", "--num-cls-classes", "5", "--mask-suffix", "_mask", "--label-regex", r"^\d+_\d+_(\d+)_"])
        T.build_datasets(cfg)
    finally:
        T.log.removeHandler(caplog.handler)
    (only,) = {r.getMessage() for r in caplog.records if "hold only background" in r.getMessage()}
    (most,) = {r.getMessage() for r in caplog.records if "more than 50%" in r.getMessage()}
    assert str(odd) in only and "mask // 255" in only
    assert str(mostly) in most and "more than 50% ignore_index" in most


@pytest.mark.parametrize("batch_size", [1, 3])
def test_val_loss_scores_the_dice_over_the_split_whatever_the_batches(batch_size):
    # evaluate() sums the Dice term's intersections and areas over the split: the val loss of a model must not
    # depend on how the val images are batched, and equal logits must cost exactly the baseline's uniform guess.
    import torch

    from data import build_datasets, build_loaders

    cfg = load_config(TINY)
    train_ds, val_ds = build_datasets(cfg)
    torch.manual_seed(0)
    model, loss_fn = T.build_model(cfg), T.build_loss(cfg)
    scores = {}
    for size in (8, batch_size):
        cfg.batch_size = size
        _, loader = build_loaders(cfg, train_ds, val_ds, torch.device("cpu"))
        scores[size] = T.evaluate(model, loader, loss_fn, cfg, torch.device("cpu"))["val_seg_loss"]
    assert scores[batch_size] == pytest.approx(scores[8], rel=1e-6)

    class EqualLogits(torch.nn.Module):
        def forward(self, x):
            return x.new_zeros(x.shape[0], 4, *x.shape[2:]), x.new_zeros(x.shape[0], 3)

    uniform = T.evaluate(EqualLogits(), loader, loss_fn, cfg, torch.device("cpu"))["val_seg_loss"]
    val_pixels = dataset_stats(val_ds, cfg, sample=None)[0].pixel_counts
    assert uniform == pytest.approx(math.log(4) + cfg.dice_weight * uniform_dice(val_pixels), rel=1e-6)
