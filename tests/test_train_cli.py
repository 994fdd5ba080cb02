"""End to end: the real main() on a tiny config, its outputs, resume, and checkpoint validation."""

import csv
import json
import math
import os

import pytest
import torch
import yaml

import train_enhanced_adaptivestream as T
from data import IMAGENET_MEAN, build_datasets, build_loaders
import results
from conftest import TINY, assert_same_training_state


def test_main_trains_and_writes_the_run_folder(tiny_args, tmp_path):
    assert T.main(tiny_args) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "steps.jsonl", "train.log", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == results.METRIC_COLUMNS
    assert all(math.isfinite(float(r["val_miou"])) and r["skipped_steps"] == "0" for r in rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["image_size"] == 32 and "out_dir" not in saved and "resume" not in saved  # it repeats the run
    payload = T.load_checkpoint(run / "last.pt")
    assert payload["state"]["epoch"] == 2 and payload["state"]["step"] == 8
    assert payload["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert "epoch 2/2" in (run / "train.log").read_text()


def capture_resumed_run(monkeypatch):
    """Patch fit and train_step: what fit starts from (the restored training state) and the first batch."""
    captured = {}
    original_fit, original_step = T.fit, T.train_step

    def fit(run):
        captured["state"] = T._cpu_copy(T.training_state(run))
        return original_fit(run)

    def step(run, images, masks, labels):
        captured.setdefault("images", images.clone())
        return original_step(run, images, masks, labels)

    monkeypatch.setattr(T, "fit", fit)
    monkeypatch.setattr(T, "train_step", step)
    return captured


def expected_first_batch(args, payload, epoch):
    """The first training batch of `epoch` in one process, drawn with the checkpoint's RNG state."""
    cfg = T.load_config(args)
    train_ds, val_ds = build_datasets(cfg)
    loader, _ = build_loaders(cfg, train_ds, val_ds, torch.device("cpu"))
    loader.sampler.set_epoch(epoch)
    cpu = torch.device("cpu")
    rng = T.rng_state(cpu)
    T.set_rng_state(payload["rng"], cpu)
    try:
        return next(iter(loader))["image"]
    finally:
        T.set_rng_state(rng, cpu)


def test_resume_continues_from_the_saved_epoch(tiny_args, tmp_path, monkeypatch):
    args = tiny_args + ["--grad-spike-factor", "1000", "--spike-warmup", "2"]
    assert T.main(args) == 0
    run = tmp_path / "run"
    saved = T.load_checkpoint(run / "last.pt")
    captured = capture_resumed_run(monkeypatch)
    assert T.main(args + ["--epochs", "3", "--resume", str(run / "last.pt")]) == 0
    # weights, optimizer, schedule position and guard as saved (the LR differs: the schedule now spans 3 epochs)
    assert_same_training_state(saved, captured["state"], lr=False)
    assert saved["guard"]["accepted"].item() == 8
    assert torch.equal(captured["images"], expected_first_batch(args, saved, epoch=2))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert T.load_checkpoint(run / "last.pt")["state"]["step"] == 12


def scripted_val_miou(monkeypatch, values):
    """evaluate() as it is, but reporting these val mIoUs, one per epoch."""
    original, scripted = T.evaluate, iter(values)

    def evaluate(*args, **kwargs):
        result = original(*args, **kwargs)
        result["val_miou"] = next(scripted)
        return result

    monkeypatch.setattr(T, "evaluate", evaluate)


def end_event(run_dir):
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    (end,) = [e for e in map(json.loads, lines) if e["event"] == "end"]
    return end


def test_patience_epochs_without_a_better_val_miou_stop_the_run_early(tiny_args, tmp_path, monkeypatch):
    scripted_val_miou(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.9])
    assert T.main(tiny_args + ["--epochs", "5", "--patience", "2"]) == 0
    run = tmp_path / "run"
    assert [r["epoch"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["1", "2", "3", "4"]
    end = end_event(run)
    assert end["outcome"] == "early_stop" and end["epochs_done"] == 4
    assert "early stop: no better val mIoU for 2 epochs (best 0.6000 at epoch 2)" in (run / "train.log").read_text()
    # last.pt knows the run is over: resuming it trains nothing and says how to go on
    assert T.load_checkpoint(run / "last.pt")["state"]["early_stop"].startswith("no better val mIoU")
    assert T.main(tiny_args + ["--epochs", "5", "--patience", "2", "--resume", str(run / "last.pt")]) == 0
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 4
    assert "already finished at epoch 4 (early stop: no better val mIoU" in (run / "train.log").read_text()


def test_best_pt_is_written_only_when_val_miou_improves(tiny_args, tmp_path, monkeypatch):
    scripted_val_miou(monkeypatch, [0.5, 0.6, 0.55])
    assert T.main(tiny_args + ["--epochs", "3"]) == 0
    run = tmp_path / "run"
    best, last = T.load_checkpoint(run / "best.pt"), T.load_checkpoint(run / "last.pt")
    assert best["state"]["epoch"] == 2 and best["state"]["best_miou"] == 0.6
    assert last["state"]["epoch"] == 3 and last["state"]["best_epoch"] == 2
    assert not torch.equal(best["model"]["seg_head.weight"], last["model"]["seg_head.weight"])


def test_bad_config_returns_2_and_names_the_key(tmp_path, capsys):
    assert T.main(TINY + ["--out-dir", str(tmp_path / "r"), "--min-lr", "1"]) == 2
    assert "min_lr" in capsys.readouterr().err


def payload_for(tmp_path, tiny_args):
    assert T.main(tiny_args) == 0
    return tmp_path / "run" / "last.pt"


def test_checkpoint_validation_names_the_file_and_the_problem(tmp_path, tiny_args):
    path = payload_for(tmp_path, tiny_args)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(T.CheckpointError, match="truncated.pt cannot be read"):
        T.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(T.CheckpointError, match="foreign.pt is not a checkpoint of this script"):
        T.load_checkpoint(foreign)
    payload = torch.load(path, weights_only=True)
    payload["model"]["seg_head.weight"][0, 0] = float("nan")
    nan_file = tmp_path / "nan.pt"
    torch.save(payload, nan_file)
    with pytest.raises(T.CheckpointError, match=r"nan.pt has non-finite weights: model.seg_head.weight \(1 NaN"):
        T.load_checkpoint(nan_file)
    cfg = T.load_config(tiny_args + ["--num-seg-classes", "3"])
    with pytest.raises(T.CheckpointError, match="num_seg_classes=4.*num_seg_classes=3"):
        T.load_checkpoint(path, cfg)
    with pytest.raises(T.CheckpointError, match="missing.pt does not exist"):
        T.load_checkpoint(tmp_path / "missing.pt")
    payload = torch.load(path, weights_only=True)  # an earlier layout: one block fewer at stride 4
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("encoder.stages.1.2.")}
    old = tmp_path / "old_layout.pt"
    torch.save(payload, old)
    with pytest.raises(T.CheckpointError, match=r"old_layout.pt holds weights of another model layout .*\(missing: "
                                                r"encoder.stages.1.2.body.0.0.weight, .* \(\d+\)\): it was written by "
                                                r"an earlier version"):
        T.load_checkpoint(old)


def test_a_resume_goes_on_with_the_checkpoints_settings_unless_the_command_gives_them(tmp_path):
    """--resume alone continues the run as it was trained (a default changed since, or a flag left out, does not
    change it); a setting given again wins; amp, channels_last and compile, where auto, are resolved again."""
    run = tmp_path / "run"
    first = ["--label-smoothing", "0.1", "--cls-weight", "0.7", "--stem-kernel", "5", "--base-lr", "0.05", "--epochs", "1"]
    assert T.main(TINY + first + ["--out-dir", str(run)]) == 0
    # TINY gives --epochs 2 and the command --cls-weight 0.9, --min-lr 0.01 (above the default base_lr: checked
    # against the checkpoint's 0.05) and --weight-decay 0.01; label_smoothing, stem_kernel and base_lr are left out
    again = TINY + ["--cls-weight", "0.9", "--min-lr", "0.01", "--weight-decay", "0.01", "--out-dir", str(run),
                    "--resume", "auto"]
    assert T.main(again) == 0
    resumed = yaml.safe_load((run / "config.yaml").read_text())
    assert (resumed["label_smoothing"], resumed["stem_kernel"], resumed["base_lr"]) == (0.1, 5, 0.05)
    assert (resumed["cls_weight"], resumed["epochs"], resumed["min_lr"]) == (0.9, 2, 0.01)  # given again
    saved = T.load_checkpoint(run / "last.pt")
    assert saved["state"]["epoch"] == 2
    # what the optimizer and schedule ran with: the settings, not the saved state's hyperparameters
    assert (saved["scheduler"]["base_lrs"], saved["scheduler"]["min_lr"]) == ([0.05, 0.05], 0.01)
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.01, 0.0]
    log = (run / "train.log").read_text()
    assert "stem_kernel=5 (default 7), label_smoothing=0.1 (default 0.0), base_lr=0.05 (default 0.001) (give one" in log
    # A checkpoint holds what amp, channels_last and compile became and which were auto: this machine decides
    # those again (for a resume and for --eval-only alike); an explicit choice (TINY's --amp off ...) travels.
    payload = T.load_checkpoint(run / "last.pt")
    assert payload["auto_settings"] == []
    payload["config"].update(amp="bf16", compile="on")
    payload["auto_settings"] = ["amp"]
    moved = tmp_path / "moved.pt"
    torch.save(payload, moved)
    argv = ["--resume", str(moved)]
    cfg = T.resumed_config(T.load_config(argv), T.load_checkpoint(moved), argv)
    assert (cfg.amp, cfg.compile, cfg.channels_last, cfg.label_smoothing, cfg.image_size) == (
        "auto", "on", "off", 0.1, 32)
    evaluate = ["--eval-only", "--checkpoint", str(moved)]
    assert T.inference_config(T.load_config(evaluate), evaluate)[0].amp == "auto"
    # one from before the record: a resume resolves all three again, as resumes did then; --eval-only keeps them
    del payload["auto_settings"]
    torch.save(payload, moved)
    cfg = T.resumed_config(T.load_config(argv), T.load_checkpoint(moved), argv)
    assert (cfg.amp, cfg.compile, cfg.channels_last) == ("auto", "auto", "auto")
    assert T.inference_config(T.load_config(evaluate), evaluate)[0].amp == "bf16"


def test_sync_bn_on_cpu_under_torchrun_exits_2_also_when_a_checkpoint_brings_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert T.main(TINY + ["--sync-bn", "--epochs", "1", "--out-dir", str(run)]) == 0  # one process: no SyncBN
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    assert T.main(TINY + ["--out-dir", str(run), "--resume", "auto"]) == 2
    assert "sync_bn: SyncBatchNorm needs CUDA" in capsys.readouterr().err
    assert (run / "last.pt").is_file()  # an existing run folder is kept


def test_resuming_with_another_optimizer_exits_2_naming_the_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert T.main(TINY + ["--optimizer", "sgd", "--epochs", "1", "--out-dir", str(run)]) == 0
    assert T.main(TINY + ["--optimizer", "adamw", "--out-dir", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "trained with optimizer='sgd', but the current config has optimizer='adamw'" in err
    assert "Traceback" not in err


def test_a_resume_keeps_a_warm_up_that_more_epochs_would_lengthen(tmp_path):
    run = tmp_path / "run"  # 1 epoch with 5 of warm-up: shortened to half the run (2 steps), then done
    assert T.main(TINY + ["--epochs", "1", "--warmup-epochs", "5", "--out-dir", str(run)]) == 0
    assert T.load_checkpoint(run / "last.pt")["scheduler"]["warmup_steps"] == 2
    assert T.main(TINY + ["--epochs", "4", "--warmup-epochs", "5", "--out-dir", str(run), "--resume", "auto"]) == 0
    assert T.load_checkpoint(run / "last.pt")["scheduler"]["warmup_steps"] == 2  # not a second warm-up of 8


def test_an_old_scale_lr_checkpoint_holds_base_lr_as_given(tiny_args, tmp_path):
    """Before commit d9ba77a --scale-lr wrote base_lr x processes into the config: read back as given, so that
    a resume does not scale it twice."""
    assert T.main(tiny_args + ["--scale-lr", "--epochs", "1"]) == 0
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    payload["config"]["base_lr"] = 2e-3  # as 2 processes wrote it then
    payload["rng"]["ranks"] *= 2
    del payload["auto_settings"]
    torch.save(payload, tmp_path / "old.pt")
    assert T.load_checkpoint(tmp_path / "old.pt")["config"]["base_lr"] == 1e-3
    payload["auto_settings"] = []  # written since: as it is
    torch.save(payload, tmp_path / "new.pt")
    assert T.load_checkpoint(tmp_path / "new.pt")["config"]["base_lr"] == 2e-3


def test_only_the_training_script_defers_the_checks_between_keys_to_the_checkpoint():
    argv = TINY + ["--resume", "auto", "--min-lr", "1"]  # above the default base_lr
    with pytest.raises(T.ConfigError, match="min_lr"):
        T.load_config(argv)  # diagnose_training.py, the benchmarks: no checkpoint will complete it
    assert T.load_config(argv, checkpoint_to_come=True).min_lr == 1


def test_resume_from_a_bad_checkpoint_exits_2(tmp_path, tiny_args, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert T.main(tiny_args + ["--resume", str(bad)]) == 2
    assert "bad.pt" in capsys.readouterr().err


def test_non_finite_weights_are_never_written(tmp_path):
    good = tmp_path / "last.pt"
    assert T.save_checkpoint(good, {"format": T.CHECKPOINT_FORMAT, "model": {"w": torch.ones(2)}})
    before = good.read_bytes()
    assert not T.save_checkpoint(good, {"format": T.CHECKPOINT_FORMAT, "model": {"w": torch.tensor([1.0, math.inf])}})
    assert good.read_bytes() == before
    assert not (tmp_path / "last.pt.tmp").exists()


def test_deterministic_flag_sets_deterministic_algorithms_and_the_cublas_workspace(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so the test leaves the variable as it found it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cfg = T.load_config(TINY + ["--deterministic"])
    try:
        T.configure_backends(cfg, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        T.configure_backends(T.load_config(TINY), torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


@pytest.mark.parametrize("device, message", [
    ("tpu", "device: 'tpu' is not a device this script trains on; this machine has: cpu"),
    ("cuda:x", "device: 'cuda:x' is not a device this script trains on"),
])
def test_a_bad_device_exits_2_naming_the_devices_and_leaves_no_run_folder(tmp_path, capsys, device, message):
    run = tmp_path / "run"
    args = [a for a in TINY if a not in ("--device", "cpu")]
    assert T.main(args + ["--device", device, "--out-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()


def test_a_cuda_device_always_has_the_index_that_set_device_needs(monkeypatch):
    """torch.cuda.set_device raises ValueError for an index-less torch.device("cuda") before it touches a
    driver: every single-GPU run (--device cuda, or auto on a GPU machine) stopped at start-up that way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [T.resolve_device(name) for name in ("auto", "cuda", "cuda:0", "cuda:1", "cpu")] == [
        torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1),
        torch.device("cpu")]
    chosen = []  # set_device's own argument check (torch.cuda._utils._get_device_index), without a driver
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.cuda._utils._get_device_index(d)))
    monkeypatch.setattr(T, "configure_backends", lambda cfg, device: None)
    for name in ("auto", "cuda", "cuda:1"):
        assert T.setup_distributed(T.load_config(TINY + ["--device", name]))[2].type == "cuda"
    assert chosen == [0, 0, 1]
    # --predict and diagnose_training.py on cuda:1 make it the current device too (pinned memory goes there)
    assert T.use_device("cuda:1") == torch.device("cuda", 1) and chosen[-1] == 1


def test_a_start_up_error_removes_the_run_folder_it_made_but_keeps_one_that_existed(tmp_path):
    made, existing = tmp_path / "made", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for run in (made, existing):
        code = T.main(TINY + ["--dataset", "folder", "--data-root", str(tmp_path / "missing"), "--out-dir", str(run)])
        assert code == 2
    assert not made.exists()
    assert (existing / "notes.txt").read_text() == "mine"


def test_resuming_a_finished_run_says_so_and_more_epochs_continue_it(tiny_args, tmp_path):
    run = tmp_path / "run"
    assert T.main(tiny_args) == 0
    assert T.main(tiny_args + ["--resume", str(run / "last.pt")]) == 0
    log = (run / "train.log").read_text()
    assert "already finished at epoch 2: nothing to train. To train further, resume with --epochs M" in log
    assert T.main(tiny_args + ["--resume", str(run / "last.pt"), "--epochs", "3"]) == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["lr"]) == pytest.approx(1e-6)  # the schedule was stretched to 3 epochs and ran out


def test_the_saved_config_repeats_the_run_instead_of_resuming_it(tiny_args, tmp_path):
    first, second = tmp_path / "run", tmp_path / "again"
    assert T.main(tiny_args) == 0
    assert T.main(tiny_args + ["--epochs", "3", "--resume", str(first / "last.pt")]) == 0  # its config.yaml now
    assert T.main(["--config", str(first / "config.yaml"), "--out-dir", str(second)]) == 0
    assert "resumed from" not in (second / "train.log").read_text()
    assert [r["epoch"] for r in csv.DictReader(open(second / "metrics.csv"))] == ["1", "2", "3"]  # trained anew
    assert T.load_checkpoint(second / "last.pt")["state"]["step"] == 12
