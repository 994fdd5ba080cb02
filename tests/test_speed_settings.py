"""benchmarks/speed_settings.py: the same model and weights in each memory format, timed side by side."""

import json
import math

from conftest import TINY, load_benchmark


def test_speed_settings_times_each_arm_against_eager(tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = TINY + ["--arms", "eager,channels_last", "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert load_benchmark("speed_settings").main(argv) == 0
    arms = json.loads(out.read_text())["arms"]
    assert list(arms) == ["eager", "channels_last"]
    assert arms["eager"]["speedup_vs_eager"] == 1.0
    for arm in arms.values():
        assert math.isfinite(arm["train_images_per_s"]) and arm["train_images_per_s"] > 0
        assert arm["first_step_s"] is None  # nothing compiled
    assert "| channels_last |" in capsys.readouterr().out


def test_speed_settings_needs_the_eager_reference(capsys):
    assert load_benchmark("speed_settings").main(TINY + ["--arms", "compile"]) == 2
    assert "eager is missing" in capsys.readouterr().err
