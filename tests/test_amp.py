"""AMP auto: resolved once from what the hardware computes natively, logged, saved resolved in checkpoints."""


import pytest
import torch
import yaml

import diagnose_training as D
import train_enhanced_adaptivestream as T
from config import ConfigError, load_config
from conftest import TINY

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


@pytest.mark.parametrize("extra, found", [("", []), ("avx512_bf16", ["avx512_bf16"]),
                                          ("amx_tile amx_bf16 avx512_bf16", ["amx_bf16", "avx512_bf16"])])
def test_cpu_bf16_flags_reads_the_flags_line(tmp_path, extra, found):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    assert T.cpu_bf16_flags(cpuinfo) == found


def test_cpu_bf16_flags_without_cpuinfo_is_empty(tmp_path):
    assert T.cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize("flags, expected", [(["amx_bf16"], "bf16"), (["avx512_bf16"], "bf16"), ([], "off")])
def test_auto_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(T, "cpu_bf16_flags", lambda: flags)
    amp, why = T.resolve_amp("auto", torch.device("cpu"))
    assert amp == expected
    assert ("native bf16" in why) and (flags[0] in why if flags else "without" in why)


@pytest.mark.parametrize("native, emulated, expected", [
    (True, True, "bf16"),  # Ampere and later
    (False, True, "off"),  # V100, T4: torch.cuda.is_bf16_supported() says True by default, emulating it
    (False, False, "off")])
def test_auto_on_cuda_is_bf16_only_where_the_gpu_computes_it_and_never_fp16(monkeypatch, native, emulated, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (including_emulation and emulated))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setattr(T, "cpu_bf16_flags", lambda: ["amx_bf16"])  # the CPU's answer must not leak in
    amp, why = T.resolve_amp("auto", torch.device("cuda", 0))
    assert amp == expected and "Fake GPU" in why


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_explicit_amp_passes_through(monkeypatch, amp):
    monkeypatch.setattr(T, "cpu_bf16_flags", lambda: ["amx_bf16"])
    assert T.resolve_amp(amp, torch.device("cpu"))[0] == amp


def test_auto_is_the_default_and_a_typo_names_the_key():
    assert load_config([]).amp == "auto"
    with pytest.raises(ConfigError, match=r"^amp: 'autp' is not one of .*did you mean 'auto'"):
        load_config(["--amp", "autp"])


def test_unresolved_auto_never_reaches_autocast():
    with pytest.raises(ValueError, match="resolve_amp"):
        T.autocast("auto", torch.device("cpu"))


def test_run_logs_the_resolution_keeps_auto_in_config_yaml_and_saves_the_resolved_value(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "cpu_bf16_flags", lambda: ["amx_bf16"])
    run_dir = tmp_path / "run"
    args = [a for a in TINY if a != "--no-require-learning"]
    assert T.main(args + ["--amp", "auto", "--epochs", "1", "--no-require-learning", "--out-dir", str(run_dir)]) == 0
    assert "amp auto -> bf16 (CPU has native bf16: amx_bf16" in (run_dir / "train.log").read_text()
    # config.yaml repeats the run (another machine resolves auto again); the checkpoint records what ran.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["amp"] == "auto"
    assert T.load_checkpoint(run_dir / "last.pt")["config"]["amp"] == "bf16"


def test_diagnose_accepts_auto_and_resolves_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "cpu_bf16_flags", lambda: [])
    code = D.main(TINY + ["--amp", "auto", "--quick"])
    out = capsys.readouterr().out
    assert "amp auto -> off (CPU without native bf16" in out
    assert code in (0, 1), out  # a tiny fresh model may WARN/FAIL a check; usage errors would be 2
