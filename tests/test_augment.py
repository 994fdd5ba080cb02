"""Augmentation settings (AUGMENT, HFLIP, CROP_SCALE, COLOR_JITTER) change what the joint transforms do,
keep image and mask aligned under every setting, and are range-checked; benchmarks/make_digits.py builds a
folder dataset that build_datasets reads."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from conftest import TINY, load_benchmark
from data import IMAGENET_MEAN, IMAGENET_STD, build_datasets, build_transforms, describe_augmentation, to_sample
from fake_data import HEIGHT, WIDTH

MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]


def folder_cfg(*extra: str, size: int = 32):
    # validate() needs a data_root for a folder dataset; build_transforms never reads it.
    return load_config(TINY + ["--dataset", "folder", "--data-root", "unused", "--num-seg-classes", "4",
                               "--image-size", str(size), *extra])


def blocks(height: int = 32, width: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 grey image [3, H, W] of random 4-px blocks (white = 255) and its mask [H, W] (white = class 3)."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 2, (height // 4 + 1, width // 4 + 1)).repeat(4, 0).repeat(4, 1)[:height, :width]
    image = torch.from_numpy(pattern.astype(np.uint8) * 255).expand(3, -1, -1).contiguous()
    return image, torch.from_numpy(pattern.astype(np.uint8) * 3)


def apply(cfg, image: torch.Tensor, mask: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    sample = to_sample(image, mask, 0, "x", build_transforms(cfg, train=train))
    return sample["image"], sample["mask"]


def normalised(image: torch.Tensor) -> torch.Tensor:
    return (image.float() / 255 - MEAN) / STD


@pytest.mark.parametrize("hflip, flipped", [("0", False), ("1", True)])
def test_hflip_0_returns_the_input_exactly_and_hflip_1_always_mirrors_image_and_mask(hflip, flipped):
    cfg = folder_cfg("--hflip", hflip, "--crop-scale", "1", "--color-jitter", "0")
    image, mask = blocks()
    want_image, want_mask = (image.flip(-1), mask.flip(-1)) if flipped else (image, mask)
    for seed in range(5):
        torch.manual_seed(seed)
        out, out_mask = apply(cfg, image, mask)
        torch.testing.assert_close(out, normalised(want_image), rtol=0, atol=1e-6)
        assert torch.equal(out_mask, want_mask)


def test_crop_scale_1_keeps_the_whole_image_even_when_it_flips():
    cfg = folder_cfg("--hflip", "0.5", "--crop-scale", "1", "--color-jitter", "0")
    image, mask = blocks()
    flips = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out, out_mask = apply(cfg, image, mask)
        flipped = torch.equal(out_mask, mask.flip(-1))
        flips += flipped
        assert flipped or torch.equal(out_mask, mask)
        torch.testing.assert_close(out, normalised(image.flip(-1) if flipped else image), rtol=0, atol=1e-6)
    assert 0 < flips < 12  # p = 0.5 really draws


def test_no_augment_is_deterministic_and_equals_the_validation_transform():
    cfg = folder_cfg("--no-augment", "--hflip", "1", "--crop-scale", "0.1", "--color-jitter", "0.9")
    image, mask = blocks(HEIGHT, WIDTH)  # not square: resize + centre crop
    torch.manual_seed(0)
    first = apply(cfg, image, mask)
    torch.manual_seed(1)
    second = apply(cfg, image, mask)
    val = apply(cfg, image, mask, train=False)
    for a, b, c in zip(first, second, val):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_default_augmentation_is_random():
    cfg = folder_cfg()
    image, mask = blocks()
    masks = []
    for seed in range(4):
        torch.manual_seed(seed)
        masks.append(apply(cfg, image, mask)[1])
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("flags", [
    [],  # the defaults
    ["--crop-scale", "0.1", "--hflip", "1"],
    ["--crop-scale", "0.5", "--hflip", "0.5", "--color-jitter", "0.5"],
    ["--crop-scale", "1", "--hflip", "1", "--color-jitter", "0.5"],
    ["--no-augment"],
], ids=["defaults", "small-crop-flip", "all-on", "no-crop-flip-jitter", "no-augment"])
def test_image_and_mask_stay_aligned_under_every_setting(flags):
    """The thresholded image must equal the mask, whatever geometry was drawn (odd, non-square input)."""
    cfg = folder_cfg(*flags)
    image, mask = blocks(HEIGHT, WIDTH, seed=3)
    for seed in range(8):
        torch.manual_seed(seed)
        out, out_mask = apply(cfg, image, mask)
        assert set(out_mask.unique().tolist()) <= {0, 3}  # nearest: no blended class values
        grey = (out * STD + MEAN).mean(0)  # [H, W]; jitter keeps the order of grey levels (strength <= 0.5)
        white = grey > (grey.max() + grey.min()) / 2
        # Only edge pixels may differ (the image is resampled bilinearly, the mask with nearest-exact).
        assert (white == (out_mask == 3)).float().mean().item() > 0.95, f"seed {seed}"


def test_synthetic_only_flips_and_says_which_settings_do_not_apply():
    cfg = load_config(TINY + ["--crop-scale", "0.2", "--color-jitter", "0.5", "--hflip", "1"])
    kinds = [type(t).__name__ for t in build_transforms(cfg, train=True).transforms]
    assert kinds == ["Resize", "RandomHorizontalFlip", "ToDtype", "Normalize"]
    line = describe_augmentation(cfg)
    assert "no crop" in line and "no colour jitter" in line and "do not apply" in line


@pytest.mark.parametrize("flag, value, key", [("--hflip", "1.5", "hflip"), ("--hflip", "-0.1", "hflip"),
                                              ("--crop-scale", "0", "crop_scale"),
                                              ("--crop-scale", "1.2", "crop_scale"),
                                              ("--color-jitter", "-0.2", "color_jitter"),
                                              ("--color-jitter", "2", "color_jitter")])
def test_out_of_range_augmentation_settings_name_the_key(flag, value, key):
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        load_config(TINY + [flag, value])


def test_augmentation_settings_read_from_yaml(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("augment: false\nhflip: 0.0\ncrop_scale: 0.8\ncolor_jitter: 0.1\n")
    cfg = load_config(TINY + ["--config", str(path)])
    assert (cfg.augment, cfg.hflip, cfg.crop_scale, cfg.color_jitter) == (False, 0.0, 0.8, 0.1)


# ---- benchmarks/make_digits.py ----
def load_make_digits():
    return load_benchmark("make_digits")


def test_make_digits_builds_a_folder_dataset_that_build_datasets_reads(tmp_path):
    pytest.importorskip("sklearn")
    make_digits = load_make_digits()
    out = tmp_path / "digits"
    assert make_digits.main(["--out", str(out), "--size", "32", "--train", "12", "--val", "4", "--seed", "1"]) == 0
    cfg = load_config(TINY + ["--dataset", "folder", "--data-root", str(out), "--num-seg-classes", "2",
                              "--num-cls-classes", "10", "--no-augment"])
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (12, 4)
    assert [p.name for p in (out / "images").iterdir()] and len(list((out / "masks").iterdir())) == 16
    sample = train[0]
    assert sample["image"].shape == (3, 32, 32) and set(sample["mask"].unique().tolist()) == {0, 1}
    assert 0 <= sample["label"] < 10
    again = tmp_path / "again"
    make_digits.main(["--out", str(again), "--size", "32", "--train", "12", "--val", "4", "--seed", "1"])
    for name in ("labels.csv", "splits/train.txt", "splits/val.txt", f"images/{train.records[0].image.name}"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_make_digits_without_scikit_learn_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import sklearn.datasets raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(SystemExit) as exc:
        load_make_digits().main(["--out", str(tmp_path / "d")])
    assert exc.value.code == 2 and "pip install scikit-learn" in capsys.readouterr().err


def test_make_digits_rejects_more_digits_than_exist(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert load_make_digits().main(["--out", str(tmp_path / "d"), "--train", "1700", "--val", "200"]) == 2
    assert "at most 1797" in capsys.readouterr().err
