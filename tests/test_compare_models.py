"""benchmarks/compare_models.py: size, speed and a side-by-side training run per model, on a tiny config."""

import json

from conftest import TINY, load_benchmark


def test_compare_models_reports_size_speed_and_training_figures_per_model(tmp_path, capsys):
    out = tmp_path / "compare.json"
    argv = TINY + ["--models", "adaptivestream:3", "--precisions", "off", "--steps", "2", "--warmup", "1",
                   "--eval-batches", "1", "--epochs", "2", "--vis-every", "0", "--target-miou", "0.01",
                   "--target-cls-acc", "1.0", "--json", str(out)]
    assert load_benchmark("compare_models").main(argv) == 0
    result = json.loads(out.read_text())
    size, speed = result["sizes"]["adaptivestream"], result["speed"]["adaptivestream"]["off"]
    assert size["params"] > 0 and size["gflops_per_image"] > 0
    assert speed["train_images_per_s"] > 0 and speed["eval_images_per_s"] > 0
    trained = result["training"]["models"]["adaptivestream"]
    # its own schedule of 3 epochs (":3"), not --epochs 2
    assert [p["epoch"] for p in trained["curve"]] == [1, 2, 3] and trained["stopped_by"] == "schedule"
    assert trained["schedule_epochs"] == 3
    assert trained["to_target"]["val_miou"] == {"epoch": 1, "seconds": trained["curve"][0]["seconds"]}
    assert trained["to_target"]["val_cls_acc"] is None  # a target of 1.0 is out of reach in 3 tiny epochs
    assert trained["final"] == trained["curve"][-1]
    table = capsys.readouterr().out
    assert "| adaptivestream |" in table and "| 3 | epoch 1," in table and "| not reached |" in table


def test_compare_models_rejects_an_unknown_model_or_bad_epochs_with_exit_2(capsys):
    assert load_benchmark("compare_models").main(TINY + ["--models", "adaptivestream,resnet81"]) == 2
    assert "--models: 'resnet81' is neither smp nor a backbone" in capsys.readouterr().err
    assert load_benchmark("compare_models").main(TINY + ["--models", "adaptivestream:0"]) == 2
    assert "the epochs after ':' must be a whole number >= 1" in capsys.readouterr().err
