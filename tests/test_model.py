"""AdaptiveStream: logits always match the input size; initial loss is about ln(C) per head."""

import math
import urllib.error

import pytest
import torch
from PIL import Image

import train_enhanced_adaptivestream as T
from config import ConfigError
from conftest import TINY
from data import uniform_dice


def tiny_model(**kwargs):
    return T.AdaptiveStream(2, 5, width=4, stream_channels=16, decoder_channels=4, **kwargs)


@pytest.mark.parametrize("height, width", [(224, 224), (256, 256), (192, 320), (200, 300), (33, 47)])
def test_seg_logits_have_the_input_size(height, width):
    model = tiny_model().eval()
    seg, cls = model(torch.randn(1, 3, height, width))
    assert seg.shape == (1, 2, height, width)
    assert cls.shape == (1, 5)


def test_decoder_is_five_transposed_conv_stages_from_stride_32():
    model = tiny_model()
    ups = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 5 and all(u.kernel_size == (4, 4) and u.stride == (2, 2) for u in ups)
    feats = model.encoder(torch.randn(1, 3, 224, 224))
    assert [f.shape[-1] for f in feats] == [112, 56, 28, 14, 7]


@pytest.mark.parametrize("kernel", [3, 7])
def test_the_stem_kernel_sets_the_first_conv_and_keeps_every_stride(kernel):
    model = tiny_model(stem_kernel=kernel)
    stem = model.encoder.stages[0][0][0]
    assert stem.kernel_size == (kernel, kernel) and stem.stride == (2, 2) and stem.padding == (kernel // 2,) * 2
    assert [f.shape[-2:] for f in model.encoder(torch.randn(1, 3, 33, 47))] == [(17, 24), (9, 12), (5, 6), (3, 3), (2, 2)]


def test_initial_loss_is_close_to_a_uniform_guess_for_each_head():
    torch.manual_seed(0)
    model = T.AdaptiveStream(4, 3, width=8, stream_channels=32, decoder_channels=8)
    seg, cls = model(torch.randn(4, 3, 64, 64))
    masks = torch.randint(0, 4, (4, 64, 64))
    loss_fn = T.StableLoss()
    _, parts = loss_fn(seg, cls, masks, torch.randint(0, 3, (4,)))
    uniform = math.log(4) + loss_fn.dice_weight * uniform_dice(torch.bincount(masks.flatten(), minlength=4).numpy())
    assert parts["seg"].item() == pytest.approx(uniform, rel=0.1)
    assert parts["cls"].item() == pytest.approx(math.log(3), rel=0.1)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_torchvision_backbones_give_input_sized_logits(backbone):
    model = T.AdaptiveStream(3, 2, backbone=backbone, decoder_channels=4, stream_channels=16).eval()
    seg, cls = model(torch.randn(1, 3, 70, 90))
    assert seg.shape == (1, 3, 70, 90) and cls.shape == (1, 2)


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match="could not load torchvision's ImageNet weights for resnet18.*offline"):
        T.AdaptiveStream(2, 2, backbone="resnet18", pretrained=True)


def cache_resnet18_weights(torch_home):
    """torchvision's ImageNet resnet18 file, as torch.hub caches it, holding a random resnet18's weights."""
    import torchvision

    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])
    return reference


def test_pretrained_weights_load_from_the_local_torch_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must not download when the file is cached"))
    reference = cache_resnet18_weights(tmp_path)
    model = T.AdaptiveStream(2, 2, backbone="resnet18", pretrained=True)
    assert torch.equal(model.encoder.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(model.encoder.stages[-1][0][0].conv1.weight, reference.layer4[0].conv1.weight)


def test_a_pretrained_runs_checkpoint_resumes_evaluates_and_predicts_offline(monkeypatch, tmp_path):
    """Its checkpoint holds every weight: nothing fetches the ImageNet file again (an offline GPU machine)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "online"))
    cache_resnet18_weights(tmp_path / "online")
    run, args = tmp_path / "run", TINY + ["--backbone", "resnet18", "--pretrained"]
    assert T.main(args + ["--epochs", "1", "--out-dir", str(run)]) == 0
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "offline"))  # no cached file, and no network

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert T.main(["--eval-only", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "eval")]) == 0
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    assert T.main(["--predict", str(tmp_path / "red.png"), "--checkpoint", str(run / "best.pt"),
                   "--out", str(tmp_path / "predicted")]) == 0
    assert T.main(args + ["--epochs", "2", "--out-dir", str(run), "--resume", "auto"]) == 0
    assert T.load_checkpoint(run / "last.pt")["state"]["epoch"] == 2
    with pytest.raises(ConfigError, match="offline"):  # a new run still needs the file
        T.build_model(T.load_config(args))


def test_cls_pool_avgmax_feeds_each_levels_mean_and_max_to_the_cls_head():
    avg, avgmax = tiny_model(cls_pool="avg"), tiny_model(cls_pool="avgmax")
    assert avgmax.cls_head[-1].in_features == 2 * avg.cls_head[-1].in_features
    y = torch.randn(2, 16, 3, 5)
    mean, peak = avgmax.pool(y)
    assert torch.equal(mean, y.mean(dim=(2, 3))) and torch.equal(peak, y.amax(dim=(2, 3)))
    assert len(avg.pool(y)) == 1
    seg, cls = avgmax.eval()(torch.randn(2, 3, 45, 71))
    assert seg.shape == (2, 2, 45, 71) and cls.shape == (2, 5)
    with pytest.raises(ValueError, match="cls_pool"):
        tiny_model(cls_pool="max")
