"""config.py: defaults < YAML < CLI, and bad settings stop with a message naming the key."""

import subprocess
import sys

import pytest

import config
from config import ConfigError, load_config
from conftest import ROOT


def test_defaults_match_the_constants():
    cfg = load_config([])
    assert cfg.base_lr == config.BASE_LR == 1e-3
    assert cfg.min_lr == 1e-6 and cfg.max_grad_norm == 1.0 and cfg.skip_grad_norm == 100.0
    assert cfg.seg_weight == 1.0 and cfg.cls_weight == 0.5 and cfg.weight_decay == 1e-4
    assert cfg.batch_size == 8 and cfg.image_size == 224 and cfg.patience == 10


def test_every_constant_has_a_flag_and_a_comment():
    table = config.settings()
    assert len(table) > 40
    parser_flags = config.build_parser()._option_string_actions
    for name, (_, _, help_text) in table.items():
        assert config.flag(name) in parser_flags, name
        assert help_text, f"{name} has no comment"
    for flag in ("--epochs --batch-size --base-lr --min-lr --warmup-epochs --image-size --num-seg-classes "
                 "--num-cls-classes --dataset --data-root --out-dir --device --seed --config --resume").split():
        assert flag in parser_flags


def test_help_states_each_default_once():
    actions = {a.dest: a.help for a in config.build_parser()._actions}
    assert actions["OUT"].count("default") == 1 and actions["OUT_DIR"].count("default") == 1
    assert actions["BASE_LR"].endswith("(default 0.001)")


def test_a_folder_setting_given_with_the_synthetic_dataset_is_reported_as_having_no_effect():
    cfg = load_config(["--color-map", '{"0,0,0": 0}', "--val-fraction", "0.2"])  # 0.2 is the default: not reported
    assert config.unused_settings(cfg) == [
        "color_map is set but dataset synthetic does not use it (only folder): it has no effect"]
    assert config.unused_settings(load_config([])) == []


def test_a_built_in_encoder_setting_given_with_a_torchvision_backbone_is_reported_as_having_no_effect():
    cfg = load_config(["--backbone", "resnet18", "--stem-kernel", "3", "--width", "16"])  # 16 is the default
    assert config.unused_settings(cfg) == [
        "stem_kernel is set but backbone resnet18 does not use it (only the built-in adaptivestream): it has no effect"]
    assert config.unused_settings(load_config(["--stem-kernel", "3", "--width", "8"])) == []


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base_lr: 0.01\nepochs: 7\nseg_class_names: [bg, face]\nnum_seg_classes: 2\n")
    cfg = load_config(["--config", str(path), "--base-lr", "3e-4"])
    assert cfg.base_lr == 3e-4 and cfg.epochs == 7 and cfg.seg_class_names == ["bg", "face"]


def test_yaml_on_and_off_read_as_the_switch_words_not_booleans(tmp_path):
    path = tmp_path / "c.yaml"  # YAML 1.1 reads bare on/off as true/false
    path.write_text("amp: off\ncompile: on\nchannels_last: off\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.amp, cfg.compile, cfg.channels_last) == ("off", "on", "off")
    path.write_text("amp: on\n")
    with pytest.raises(ConfigError, match="amp: 'on' is not one of auto, off, bf16, fp16"):
        load_config(["--config", str(path)])


def test_cli_parses_bools_lists_and_none():
    cfg = load_config(["--pretrained", "--cls-class-weights", "1,2,3", "--out-dir", "none"])
    assert cfg.pretrained is True and cfg.cls_class_weights == [1.0, 2.0, 3.0] and cfg.out_dir is None
    assert load_config(["--no-pretrained"]).pretrained is False


def test_int_is_accepted_for_a_float_but_not_the_reverse():
    assert load_config(["--base-lr", "1"]).base_lr == 1.0
    with pytest.raises(ConfigError, match="--epochs: expected int"):
        load_config(["--epochs", "2.5"])


@pytest.mark.parametrize("argv, message", [
    (["--base-lr", "-1"], "base_lr: must be > 0"),
    (["--min-lr", "0.1"], r"min_lr \(0.1\) is above base_lr"),
    (["--image-size", "0"], "image_size: must be > 0"),
    (["--lr-decay", "cosin"], "did you mean 'cosine'"),
    (["--base-lr", "fast"], "--base-lr: expected float"),
    (["--ignore-index", "1"], "ignore_index"),
    (["--dataset", "folder"], "data_root"),
    (["--seg-class-names", "a,b"], "seg_class_names: has 2 entries but there are 4 classes"),
    (["--stem-kernel", "4"], "stem_kernel: must be an odd number"),
])
def test_out_of_range_and_wrong_type_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_unknown_flag_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown flag --base-lrr \(did you mean '--base-lr'\?\)"):
        load_config(["--base-lrr", "0.1"])


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bsae_lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'bsae_lr' \(did you mean 'base_lr'\?\)"):
        load_config(["--config", str(path)])


def test_yaml_wrong_type_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs .*expected int"):
        load_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_cli_typo_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "train_enhanced_adaptivestream.py", "--bacth-size", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--batch-size" in proc.stderr and "Traceback" not in proc.stderr


def test_markdown_table_lists_every_setting():
    table = config.markdown_table()
    for name in config.settings():
        assert f"`{name.lower()}`" in table
