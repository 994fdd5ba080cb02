"""Results people look at: prediction grids, curves, TensorBoard, --eval-only and --predict.

One tiny training run (module fixture) feeds every test that needs a trained checkpoint.
"""

import csv
import importlib.util
import json
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import train_enhanced_adaptivestream as T
from data import DataError, IMAGENET_MEAN, IMAGENET_STD, build_datasets
import results
from results import CAPTION_HEIGHT, LINE_HEIGHT, ResultsRecorder, VIS_PAD, denormalize, seg_palette
from config import ConfigError, load_config
from conftest import TINY

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run folder of a 2-epoch tiny run with a 3-image grid every 2nd epoch (and TensorBoard if installed)."""
    run_dir = tmp_path_factory.mktemp("results") / "run"
    extra = ["--vis-every", "2", "--vis-samples", "3"] + (["--tensorboard"] if HAS_TENSORBOARD else [])
    assert T.main(TINY + ["--out-dir", str(run_dir)] + extra) == 0
    return run_dir


def metrics_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_grid_is_written_every_vis_every_epochs_with_image_truth_and_prediction_panels(trained):
    assert not (trained / "vis" / "epoch_1.png").exists()  # vis_every 2: epoch 2 only
    with Image.open(trained / "vis" / "epoch_2.png") as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        grid = np.array(picture)
    # 32 px val images are shown 4x (>= VIS_MIN_PANEL); a tile is 3 panels + caption; 2 tiles per row,
    # 3 samples -> 2 rows; the legend strip above holds a title line and one line of 4 classes.
    pad, panel = VIS_PAD, 32 * 4
    tile_w, tile_h = 3 * (panel + pad) + pad, panel + 2 * pad + CAPTION_HEIGHT
    legend_h = 2 * LINE_HEIGHT + 2 * pad
    assert grid.shape == (legend_h + 2 * (tile_h + pad) + pad, 2 * (tile_w + pad) + pad, 3)

    cfg = load_config(TINY)
    _, val_ds = build_datasets(cfg)
    sample = val_ds[0]
    image = denormalize(sample["image"], IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0).numpy()
    top, left = legend_h + 2 * pad, 2 * pad  # first tile: make_grid's padding, then its own
    shown = grid[top:top + panel:4, left:left + panel:4]
    np.testing.assert_array_equal(shown, image)  # panel 1: the image itself
    truth = grid[top:top + panel:4, left + panel + pad:left + 2 * panel + pad:4].astype(int)
    mask = sample["mask"].numpy()
    palette = np.array(seg_palette(cfg.num_seg_classes))
    painted = mask > 0
    assert painted.any() and (~painted).any()
    expected = (image[painted] * 0.5 + palette[mask[painted]] * 0.5).astype(int)  # 50% class colour
    assert np.abs(truth[painted] - expected).max() <= 1  # float -> uint8 rounding
    np.testing.assert_array_equal(truth[~painted], image[~painted])  # background is not painted


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is an optional extra (pip install matplotlib)")
def test_curves_png_is_redrawn_from_metrics_csv(trained):
    with Image.open(trained / "curves.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (results.CURVES_INCHES[0] * results.CURVES_DPI, results.CURVES_INCHES[1] * results.CURVES_DPI)
    assert (trained / "curves.png").stat().st_mtime >= (trained / "metrics.csv").stat().st_mtime


def test_curves_are_off_with_one_message_when_matplotlib_is_missing(make_run, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    run = make_run("--vis-every", "0")
    caplog.set_level(logging.INFO, logger="adaptivestream")
    T.log.addHandler(caplog.handler)
    try:
        recorder = ResultsRecorder(run.cfg, run.run_dir, run.model, run.val_loader.dataset, run.device)
        for epoch in (1, 2):
            results.write_metrics_row(run.run_dir / "metrics.csv", {"epoch": epoch, "lr": 1e-3, "val_miou": 0.5})
            recorder.record_epoch(epoch, {"epoch": epoch})
    finally:
        T.log.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert messages == ["curves.png is off: matplotlib is not installed (pip install matplotlib to enable it)"]
    assert not (run.run_dir / "curves.png").exists()


def test_tensorboard_missing_stops_with_exit_2_and_says_how_to_install(tiny_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert T.main(tiny_args + ["--tensorboard"]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is an optional extra (pip install tensorboard)")
def test_tensorboard_gets_step_and_epoch_scalars_and_the_grid(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    steps = [json.loads(line) for line in open(trained / "steps.jsonl")]
    logged = [r for r in steps if r["event"] == "log"]
    grad = events.Scalars("train/grad_norm")
    assert [e.step for e in grad] == [r["step"] for r in logged]
    assert [e.value for e in grad] == pytest.approx([r["grad_norm"] for r in logged], rel=1e-6)
    rows = metrics_rows(trained)
    miou = events.Scalars("epoch/val_miou")
    assert [e.step for e in miou] == [1, 2]
    assert [e.value for e in miou] == pytest.approx([float(r["val_miou"]) for r in rows], rel=1e-5)
    assert [e.step for e in events.Scalars("epoch/skipped_steps")] == [1, 2]
    with Image.open(trained / "vis" / "epoch_2.png") as picture:
        assert [(e.step, e.width, e.height) for e in events.Images("val/predictions")] == [(2, *picture.size)]


def test_eval_only_reproduces_the_logged_metrics_of_the_checkpoint(trained, tmp_path):
    out = tmp_path / "eval"
    # No TINY flags: the model and data settings come from the checkpoint.
    assert T.main(["--eval-only", "--checkpoint", str(trained / "last.pt"), "--device", "cpu",
                   "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    last = metrics_rows(trained)[-1]
    assert report["epoch"] == int(last["epoch"]) == 2
    for key, value in report["metrics"].items():
        assert value == pytest.approx(float(last[key]), rel=1e-5, abs=1e-7), key  # csv keeps 6 digits
    with open(out / "confusion_seg.csv", newline="") as handle:
        seg = list(csv.reader(handle))
    assert seg[0] == ["true \\ predicted", "seg0", "seg1", "seg2", "seg3"] and [r[0] for r in seg[1:]] == seg[0][1:]
    seg_cm = np.array([[int(v) for v in r[1:]] for r in seg[1:]])
    assert seg_cm.sum() == 8 * 32 * 32  # every val pixel (no ignore_index in synthetic masks)
    assert np.trace(seg_cm) / seg_cm.sum() == pytest.approx(report["metrics"]["val_pixel_acc"])
    with open(out / "confusion_cls.csv", newline="") as handle:
        cls_cm = np.array([[int(v) for v in r[1:]] for r in list(csv.reader(handle))[1:]])
    assert cls_cm.shape == (3, 3) and cls_cm.sum() == 8
    assert np.trace(cls_cm) / 8 == pytest.approx(report["metrics"]["val_cls_acc"])
    assert report["per_class"]["seg"]["seg0"]["support"] == int(seg_cm[0].sum())


def expected_prediction(model, payload, path):
    """The checkpoint's model on one file, preprocessed as documented: val-size resize, checkpoint normalisation."""
    with Image.open(path) as picture:
        image = TF.pil_to_tensor(picture.convert("RGB"))
    x = TF.resize(image, [32, 32], antialias=True).float() / 255
    x = TF.normalize(x, payload["normalization"]["mean"], payload["normalization"]["std"])
    with torch.no_grad():
        seg, cls = model(x[None])
    seg = F.interpolate(seg, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
    return seg.argmax(1)[0].numpy(), int(cls.argmax(1)), float(cls.softmax(1).max())


def test_predict_writes_original_size_masks_and_the_models_argmax(trained, tmp_path):
    # A checkpoint with its own normalisation and class names: predict must use these, not the defaults.
    payload = torch.load(trained / "best.pt", weights_only=True)
    payload["normalization"] = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3]}
    payload["class_names"]["cls"] = ["cat", "dog", "bird"]
    checkpoint = tmp_path / "custom.pt"
    torch.save(payload, checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (37, 53), "tall.jpg": (64, 41), "grey.bmp": (33, 35)}  # (H, W)
    for name, (h, w) in sizes.items():
        shape = (h, w) if name == "grey.bmp" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image, not counted")
    out = tmp_path / "pred"
    assert T.main(["--predict", str(images), "--checkpoint", str(checkpoint), "--out", str(out),
                   "--device", "cpu"]) == 0

    model = T.build_model(load_config(TINY))
    model.load_state_dict(payload["model"])
    model.eval()
    with open(out / "predictions.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(str(images / name) for name in sizes)
    for name, (h, w) in sizes.items():
        mask_expected, label, confidence = expected_prediction(model, payload, images / name)
        row = rows[str(images / name)]
        assert (int(row["label"]), row["class_name"]) == (label, ["cat", "dog", "bird"][label])
        assert float(row["confidence"]) == pytest.approx(confidence, abs=1e-6)
        stem = name.rsplit(".", 1)[0]
        with Image.open(out / "masks" / f"{stem}.png") as mask:
            assert mask.mode == "L" and mask.size == (w, h)
            np.testing.assert_array_equal(np.array(mask), mask_expected)
        with Image.open(out / "overlays" / f"{stem}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (w, h)


def test_predict_names_an_unreadable_image_skips_it_and_exits_2(trained, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    out = tmp_path / "pred"
    code = T.main(["--predict", str(images), "--checkpoint", str(trained / "best.pt"), "--out", str(out),
                   "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{images / 'broken.png'}: cannot read the image" in err and "could not be read and were skipped: broken.png" in err
    with open(out / "predictions.csv", newline="") as handle:
        assert [row["file"] for row in csv.DictReader(handle)] == [str(images / "good.png")]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["good.png"]


def test_predict_refuses_a_missing_path_and_clashing_stems(tmp_path):
    with pytest.raises(DataError, match="nothing-here does not exist"):
        T.list_images(tmp_path / "nothing-here")
    for name in ("a.png", "a.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    with pytest.raises(DataError, match="a.jpg and .*a.png have the same stem: both would write the same masks"):
        T.list_images(tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--eval-only"], "checkpoint: --eval-only needs --checkpoint"),
    (["--predict", "x.png", "--checkpoint", "c.pt"], "out: --predict needs --out DIR"),
    (["--checkpoint", "c.pt"], "to continue training use --resume"),
    (["--out", "d"], "a training run's folder is --out-dir"),
    (["--eval-only", "--predict", "x.png", "--checkpoint", "c.pt", "--out", "d"], "choose one of"),
    (["--vis-every", "-1"], "vis_every: must be >= 0"),
    (["--vis-samples", "0"], "vis_samples: must be > 0"),
])
def test_result_settings_are_checked_and_name_the_key(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags)


def test_missing_checkpoint_for_eval_only_exits_2_naming_the_file(tmp_path, capsys):
    assert T.main(["--eval-only", "--checkpoint", str(tmp_path / "gone.pt")]) == 2
    assert "gone.pt does not exist" in capsys.readouterr().err
