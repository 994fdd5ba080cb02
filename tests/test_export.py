"""--export: a checkpoint as a torch.export .pt2 (or ONNX) file with its JSON contract, checked against the
eager model; --predict runs from the .pt2 alone and gives the checkpoint's predictions.

One tiny training run and one export (module fixtures) feed the tests.
"""

import csv
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_enhanced_adaptivestream as T
from config import ConfigError, load_config
from conftest import ROOT, TINY

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    assert T.main(TINY + ["--epochs", "1", "--vis-every", "0", "--out-dir", str(run_dir)]) == 0
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def exported(checkpoint):
    path = checkpoint.parent.parent / "deploy" / "model.pt2"
    # No TINY flags: the model, its class counts and normalisation come from the checkpoint.
    assert T.main(["--export", str(path), "--checkpoint", str(checkpoint)]) == 0
    return path


def eager_model(checkpoint):
    payload = T.load_checkpoint(checkpoint)
    model = T.build_model(load_config(TINY))
    model.load_state_dict(payload["model"])
    return model.eval(), payload


def test_export_writes_the_pt2_and_a_json_contract_beside_it(exported, checkpoint):
    _, payload = eager_model(checkpoint)
    info = json.loads(T.export_info_path(exported).read_text())
    assert T.export_info_path(exported).name == "model.pt2.json"
    assert info["format"] == T.EXPORT_FORMAT and info["file"] == "model.pt2"
    assert info["checkpoint"] == str(checkpoint) and info["torch_version"] == torch.__version__
    contract = info["input"]
    assert (contract["layout"], contract["dtype"], contract["channel_order"]) == ("NCHW", "float32", "RGB")
    assert contract["value_range"] == [0.0, 1.0] and contract["image_size"] == 32
    assert contract["mean"] == payload["normalization"]["mean"] and contract["std"] == payload["normalization"]["std"]
    assert info["class_names"] == payload["class_names"]
    assert info["outputs"] == [{"name": "seg_logits", "shape": ["B", 4, "H", "W"]},
                               {"name": "cls_logits", "shape": ["B", 3]}]
    assert info["check"]["atol"] == T.EXPORT_ATOL and info["check"]["rtol"] == T.EXPORT_RTOL
    assert sorted(info["check"]["max_abs_diff"]) == sorted(["2x64x64", "1x77x131", "3x31x45", "1x32x32"])
    assert info["bytes"] == exported.stat().st_size and info["export_seconds"] > 0
    assert not list(exported.parent.glob("*.tmp*"))


@pytest.mark.parametrize("batch, height, width", [(1, 64, 64), (2, 77, 131), (3, 17, 45)])
def test_loaded_pt2_equals_the_eager_model_at_any_batch_and_size(exported, checkpoint, batch, height, width):
    model, _ = eager_model(checkpoint)
    program = torch.export.load(exported).module()
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), program(x)
    assert got[0].shape == (batch, 4, height, width) and got[1].shape == (batch, 3)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=T.EXPORT_ATOL, rtol=T.EXPORT_RTOL)


def write_images(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = {"wide.png": (37, 53), "tall.jpg": (64, 41), "square.png": (32, 32)}
    for name, (h, w) in names.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return [name.rsplit(".", 1)[0] for name in names]


def test_predict_with_the_pt2_equals_predict_with_the_checkpoint(exported, checkpoint, tmp_path):
    images = tmp_path / "images"
    stems = write_images(images)
    for source, out in ((checkpoint, "from_checkpoint"), (exported, "from_pt2")):
        assert T.main(["--predict", str(images), "--checkpoint", str(source), "--out", str(tmp_path / out),
                       "--device", "cpu"]) == 0
    rows = {}
    for out in ("from_checkpoint", "from_pt2"):
        with open(tmp_path / out / "predictions.csv", newline="") as handle:
            rows[out] = list(csv.DictReader(handle))
    assert len(rows["from_pt2"]) == len(stems)
    for a, b in zip(rows["from_checkpoint"], rows["from_pt2"]):
        assert (a["file"], a["label"], a["class_name"]) == (b["file"], b["label"], b["class_name"])
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-5)
    for stem in stems:
        masks = [np.array(Image.open(tmp_path / out / "masks" / f"{stem}.png")) for out in ("from_checkpoint", "from_pt2")]
        np.testing.assert_array_equal(masks[0], masks[1])


def test_predict_with_a_pt2_without_its_json_exits_2_naming_the_file(exported, tmp_path, capsys):
    lonely = tmp_path / "lonely.pt2"
    lonely.write_bytes(exported.read_bytes())
    write_images(tmp_path / "images")
    assert T.main(["--predict", str(tmp_path / "images"), "--checkpoint", str(lonely), "--out",
                   str(tmp_path / "pred")]) == 2
    assert f"{lonely}.json does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_onnx_without_its_packages_exits_2_with_the_install_line_before_any_work(missing, tmp_path, monkeypatch,
                                                                                 capsys):
    for name in ("onnx", "onnxscript", "onnxruntime"):  # only <missing> is absent, installed or not
        monkeypatch.setitem(sys.modules, name, None if name == missing else types.ModuleType(name))
    # A checkpoint that does not exist: the package check must come first, before any loading.
    code = T.main(["--export", str(tmp_path / "model.onnx"), "--checkpoint", str(tmp_path / "gone.pt")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"export: writing .onnx needs {missing} (" in err
    assert "pip install onnx onnxscript onnxruntime" in err and "gone.pt" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--export", "model.pt", "--checkpoint", "c.pt"], "export: 'model.pt' must end in .pt2"),
    (["--export", "model.pt2"], "checkpoint: --export needs --checkpoint"),
    (["--export", "m.pt2", "--predict", "x.png", "--checkpoint", "c.pt", "--out", "d"],
     "predict, export: choose one of"),
    (["--export", "m.pt2", "--eval-only", "--checkpoint", "c.pt"], "eval_only, export: choose one of"),
    (["--export", "m.pt2", "--checkpoint", "c.pt", "--out", "d"], "out: --export writes to its own PATH"),
    (["--export", "m.pt2", "--checkpoint", "c.pt", "--device", "cuda"], "device: --export runs on the CPU"),
])
def test_export_settings_are_checked_and_name_the_key(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(flags)


def test_a_wrong_suffix_exits_2_naming_the_key(checkpoint, tmp_path, capsys):
    assert T.main(["--export", str(tmp_path / "model.pt"), "--checkpoint", str(checkpoint)]) == 2
    assert "export: " in capsys.readouterr().err and not (tmp_path / "model.pt").exists()


def test_an_export_that_differs_from_the_model_exits_1_with_the_figures_and_writes_nothing(checkpoint, tmp_path,
                                                                                           monkeypatch, capsys):
    honest = T.load_exported

    def off_by_a_hundredth(path):
        module = honest(path)

        def run(x):
            seg, cls = module(x)
            return seg + 1e-2, cls

        return run

    monkeypatch.setattr(T, "load_exported", off_by_a_hundredth)
    path = tmp_path / "model.pt2"
    assert T.main(["--export", str(path), "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "does not match" in err and "1x77x131 seg_logits: max |diff| 0.01" in err
    assert "check 1x77x131: max |exported - eager| seg_logits 0.01, cls_logits 0" in err
    assert not list(tmp_path.iterdir())  # neither the file, its JSON nor the temporary file


def test_only_rank_0_exports_under_torchrun(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert T.main(["--export", str(tmp_path / "model.pt2"), "--checkpoint", str(checkpoint)]) == 0
    assert not list(tmp_path.iterdir())


def test_docs_snippet_runs_the_pt2_with_its_json(exported, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "export.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "model.pt2").write_bytes(exported.read_bytes())
    (tmp_path / "model.pt2.json").write_text(T.export_info_path(exported).read_text())
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "docs/export.md", "exec"), scope)
    assert scope["seg_logits"].shape == (1, 4, 32, 32) and scope["cls_logits"].shape == (1, 3)


@pytest.mark.skipif(not HAS_ONNX, reason="ONNX export is optional (pip install onnx onnxscript onnxruntime)")
def test_onnx_runtime_equals_the_eager_model(checkpoint, tmp_path):
    import onnxruntime

    path = tmp_path / "model.onnx"
    assert T.main(["--export", str(path), "--checkpoint", str(checkpoint)]) == 0
    assert json.loads(T.export_info_path(path).read_text())["file"] == "model.onnx"
    model, _ = eager_model(checkpoint)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 45, 77, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    got = session.run(["seg_logits", "cls_logits"], {"images": x.numpy()})
    for want, have in zip(expected, got):
        torch.testing.assert_close(torch.from_numpy(have), want, atol=T.EXPORT_ATOL, rtol=T.EXPORT_RTOL)
