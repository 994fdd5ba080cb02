"""COMPILE: torch.compile of the model, in place. The guard keeps its skip-leaves-no-trace behaviour on the
compiled model, checkpoints hold plain keys that load into an eager model, and a failed compilation stops
the run under `on` and falls back to eager under `auto`.

Compiling the tiny model on CPU takes ~10-20 s (inductor's C++ code generation): these tests share one run."""

import copy
import json
import logging

import pytest
import torch

import train_enhanced_adaptivestream as T


@pytest.fixture(params=["0", "0.4"], ids=["no-aux", "aux-head"])
def compiled_run(make_run, request):
    if T.resolve_compile(torch.device("cpu"), T.COMPILE_MIN_STEPS)[0] == "off":
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    # the aux head: a third output to trace. --skip-grad-norm: the 32 px model's norms pass 100 on some batches
    # (121 on the second step with the aux head), and the clean step below must be accepted.
    run = make_run("--compile", "on", "--aux-weight", request.param, "--skip-grad-norm", "1e4")
    assert T.unwrap(run.model)._compiled_call_impl is not None, "--compile on did not compile the model"
    return run


def batch_of(run):
    return T.to_device(next(iter(run.train_loader)), run)


def test_a_compiled_skipped_step_leaves_no_trace_and_its_checkpoint_loads_into_an_eager_model(compiled_run, caplog,
                                                                                               tmp_path):
    run = compiled_run
    images, masks, labels = batch_of(run)
    with caplog.at_level(logging.INFO, logger=T.log.name):
        T.first_compiled_step(run, images, masks, labels)
    assert run.compile_pending is None
    assert any("compile: the first step (tracing and compilation) took" in r.getMessage() for r in caplog.records)
    before = copy.deepcopy(T.training_state(run))
    poisoned = images.clone()
    poisoned[0, :, 3, 3] = float("nan")  # NaN loss, and NaN in the BN batch statistics of the compiled forward
    row = T.train_step(run, poisoned, masks, labels)
    assert T.SKIP_REASONS[int(row[4])] == "non-finite loss"
    after = T.training_state(run)
    for name, tensor in before["model"].items():  # weights and BN buffers, bit for bit
        assert torch.equal(tensor, after["model"][name]), f"model.{name} changed on a skipped compiled step"
    for index, entry in before["optimizer"]["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["optimizer"]["state"][index][key])), \
                f"optimizer.state.{index}.{key}"

    row = T.train_step(run, images, masks, labels)  # an accepted compiled step changes the weights
    assert int(row[4]) == 0, (T.SKIP_REASONS[int(row[4])], row.tolist())
    assert any(not torch.equal(before["model"][n], t) for n, t in T.unwrap(run.model).state_dict().items())

    path = tmp_path / "compiled.pt"
    T.save_checkpoint(path, T.checkpoint_payload(run))
    payload = T.load_checkpoint(path)
    assert not [k for k in payload["model"] if "_orig_mod" in k], "a compiled model's keys leaked into the checkpoint"
    eager = T.build_model(run.cfg)
    eager.load_state_dict(payload["model"])  # strict: every key matches the eager model's
    assert eager._compiled_call_impl is None
    model = T.unwrap(run.model).eval()
    eager.eval()
    with torch.no_grad():
        for ours, theirs in zip(model(images), eager(images)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # compiled vs eager kernels


def failing_compile(self, *args, **kwargs):
    """Compilation that fails after the forward already ran once: BN running statistics moved, dropout drew."""
    def fail(*a, **k):
        self._call_impl(*a, **k)
        raise RuntimeError("simulated inductor failure\nsecond line of the compiler's error")
    self._compiled_call_impl = fail


def test_compile_auto_falls_back_to_eager_with_a_warning_and_the_state_from_before_the_step(make_run, monkeypatch,
                                                                                            caplog):
    monkeypatch.setattr(torch.nn.Module, "compile", failing_compile)
    monkeypatch.setattr(T, "resolve_compile", lambda device, steps: ("on", "patched: this machine compiles"))
    run = make_run("--compile", "auto")
    assert run.cfg.compile == "on" and run.compile_pending == "auto"
    reference = make_run("--compile", "off")  # the same seed: the same weights and the same first batch
    images, masks, labels = batch_of(run)
    rng = torch.random.get_rng_state()  # dropout draws: both runs share the process's generator
    with caplog.at_level(logging.WARNING, logger=T.log.name):
        row = T.first_compiled_step(run, images, masks, labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("compile auto" in w and "RuntimeError: simulated inductor failure" in w for w in warnings), warnings
    assert not any("second line" in w for w in warnings)
    assert run.cfg.compile == "off" and T.unwrap(run.model)._compiled_call_impl is None
    torch.random.set_rng_state(rng)
    expected = T.train_step(reference, images, masks, labels)  # one eager step from the same start
    assert torch.equal(row, expected)
    for name, tensor in T.unwrap(reference.model).state_dict().items():
        assert torch.equal(tensor, T.unwrap(run.model).state_dict()[name]), name


def test_compile_on_stops_the_run_with_exit_2_and_an_end_event_when_compilation_fails(tiny_args, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "compile", failing_compile)
    assert T.main(tiny_args + ["--compile", "on"]) == 2
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert ("error: compile: torch.compile failed in the first training step (RuntimeError: simulated inductor "
            "failure), which runs eagerly; run with --compile off") in log_text
    events = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["outcome"] == "failed" and end["exit_code"] == 2
    assert "simulated inductor failure" in end["reason"]


def failing_eval_compile(self, *args, **kwargs):
    """Compilation that works for training and fails for the eval-mode graph (its own compilation)."""
    def call(*a, **k):
        if not self.training:
            raise RuntimeError("simulated inductor failure in eval mode")
        return self._call_impl(*a, **k)
    self._compiled_call_impl = call


def test_compile_auto_falls_back_to_eager_when_the_first_evaluation_fails_to_compile(tiny_args, tmp_path,
                                                                                    monkeypatch):
    T.main(tiny_args[:-1] + [str(tmp_path / "eager"), "--epochs", "1"])  # the same run, never compiled
    monkeypatch.setattr(torch.nn.Module, "compile", failing_eval_compile)
    monkeypatch.setattr(T, "resolve_compile", lambda device, steps: ("on", "patched: this machine compiles"))
    assert T.main(tiny_args + ["--epochs", "1", "--compile", "auto"]) == 0
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert ("WARNING compile auto: torch.compile failed in the first evaluation (RuntimeError: simulated inductor "
            "failure in eval mode); going on without it (eager)") in log_text
    metrics = [(tmp_path / d / "metrics.csv").read_text().splitlines() for d in ("run", "eager")]
    columns = metrics[0][0].split(",")
    rows = [dict(zip(columns, m[1].split(","))) for m in metrics]
    for key in ("train_loss", "val_loss", "val_miou", "val_cls_acc"):  # the eager evaluation of the same weights
        assert rows[0][key] == rows[1][key], key


def test_compile_on_stops_the_run_with_exit_2_when_the_first_evaluation_fails_to_compile(tiny_args, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "compile", failing_eval_compile)
    assert T.main(tiny_args + ["--compile", "on"]) == 2
    end = json.loads((tmp_path / "run" / "steps.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["outcome"] == "failed" and end["exit_code"] == 2
    assert "torch.compile failed in the first evaluation" in end["reason"]


def compile_that_works(self, *args, **kwargs):
    """A compilation that succeeds: the compiled call is the eager one."""
    self._compiled_call_impl = lambda *a, **k: self._call_impl(*a, **k)


def loss_bug(self, *args, **kwargs):
    """A bug of the loss's own: it fails under a compiled model and an eager one alike."""
    raise RuntimeError("a bug in the loss, not in compilation")


def eval_forward_bug(self, x):
    """A bug of the model's own, in eval mode only: it fails compiled and eager alike."""
    if not self.training:
        raise RuntimeError("a bug in the eval forward, not in compilation")
    return original_forward(self, x)


original_forward = T.AdaptiveStream.forward


@pytest.mark.parametrize("asked", ["on", "auto"])
@pytest.mark.parametrize("where,target,bug", [
    ("first training step", (T.StableLoss, "forward"), loss_bug),
    ("first evaluation", (T.AdaptiveStream, "forward"), eval_forward_bug),
])
def test_an_error_of_the_first_compiled_call_that_eager_execution_repeats_is_not_called_a_compile_failure(
        tiny_args, tmp_path, monkeypatch, asked, where, target, bug):
    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_works)
    monkeypatch.setattr(T, "resolve_compile", lambda device, steps: ("on", "patched: this machine compiles"))
    monkeypatch.setattr(*target, bug)
    with pytest.raises(RuntimeError, match="not in compilation"):  # the step's own error, as it is
        T.main(tiny_args + ["--epochs", "1", "--compile", asked])
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert "torch.compile failed" not in log_text, f"the {where}'s own error was blamed on compilation"
    assert f"{where} failed when compiled (RuntimeError: a bug" in log_text  # both attempts are on record


def test_compile_auto_needs_a_long_run_and_a_code_generator(monkeypatch):
    import importlib.machinery
    import shutil
    import sys
    import types

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert T.resolve_compile(cpu, T.COMPILE_MIN_STEPS - 1)[0] == "off"
    assert T.resolve_compile(cpu, T.COMPILE_MIN_STEPS)[0] == "on"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    choice, why = T.resolve_compile(cpu, 10**6)
    assert choice == "off" and "C++ compiler" in why
    triton = types.ModuleType("triton")
    triton.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    monkeypatch.setitem(sys.modules, "triton", triton)
    assert T.resolve_compile(cuda, T.COMPILE_MIN_STEPS - 1)[0] == "off"
    assert T.resolve_compile(cuda, T.COMPILE_MIN_STEPS)[0] == "on"
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    choice, why = T.resolve_compile(cuda, 10**6)
    assert choice == "off" and "triton" in why


def test_channels_last_auto_is_on_for_cpu_and_cuda_with_amp_and_off_for_cuda_in_float32():
    assert T.resolve_channels_last("off", torch.device("cpu"))[0] == "on"
    assert T.resolve_channels_last("bf16", torch.device("cuda", 0))[0] == "on"
    assert T.resolve_channels_last("fp16", torch.device("cuda", 0))[0] == "on"
    assert T.resolve_channels_last("off", torch.device("cuda", 0))[0] == "off"


@pytest.mark.parametrize("saved, resumed", [("on", "off"), ("off", "on")])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_state_saved_in_one_memory_layout_steps_the_same_in_the_other(make_run, saved, resumed, optimizer):
    """channels_last is resolved again on resume: a checkpoint's moments come back in the parameters' layout,
    and the next optimizer step gives the weights that the saved layout would have given, bit for bit."""
    source = make_run("--channels-last", saved, "--optimizer", optimizer)
    T.train_step(source, *batch_of(source))
    state = T._cpu_copy(T.training_state(source))
    same, other = make_run("--channels-last", saved, "--optimizer", optimizer), make_run(
        "--channels-last", resumed, "--optimizer", optimizer)
    for run in (same, other):
        T.restore_training_state(run, state)
        for param in run.model.parameters():
            # one gradient by value, in the parameter's layout as autograd gives it
            param.grad = torch.empty_like(param).copy_(torch.linspace(-1, 1, param.numel()).view(param.shape))
        run.optimizer.step()
    conv = T.unwrap(other.model).encoder.stages[0][0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == (resumed == "on")
    for param in other.model.parameters():
        for value in other.optimizer.state[param].values():
            assert not torch.is_tensor(value) or value.shape != param.shape or value.stride() == param.stride()
    for (name, expected), actual in zip(same.model.named_parameters(), other.model.parameters()):
        assert torch.equal(expected, actual), name


def test_auto_settings_are_resolved_logged_and_checkpointed_as_their_choice(make_run, caplog):
    with caplog.at_level(logging.INFO, logger=T.log.name):
        run = make_run("--channels-last", "auto", "--compile", "auto")  # 8 planned steps: compile auto is off
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("channels_last auto -> on (CPU") for m in messages), messages
    assert any(m.startswith("compile auto -> off (8 steps") for m in messages), messages
    assert run.cfg.channels_last == "on" and run.cfg.compile == "off"
    conv = T.unwrap(run.model).encoder.stages[0][0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images, _, _ = batch_of(run)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert T.checkpoint_payload(run)["config"]["channels_last"] == "on"
    assert T.checkpoint_payload(run)["auto_settings"] == ["channels_last", "compile"]  # TINY gives --amp off
