"""WarmupLRScheduler: warm-up, decay, and a floor no schedule can cross (the old 8.88e-21 failure)."""

import math

import pytest
import torch

from train_enhanced_adaptivestream import WarmupLRScheduler


def make(decay="cosine", warmup=10, total=110, base=1e-3, min_lr=1e-6, **kwargs):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    return optimizer, WarmupLRScheduler(optimizer, warmup, total, min_lr, decay=decay, **kwargs)


def lrs(optimizer, scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_values_at_start_end_of_warmup_middle_and_last_step():
    optimizer, scheduler = make()
    values = lrs(optimizer, scheduler, 110)
    assert values[0] == pytest.approx(1e-3 / 10)
    assert values[9] == pytest.approx(1e-3)  # last warm-up step reaches the base LR
    mid = 10 + 99 // 2
    expected = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 99))
    assert values[mid] == pytest.approx(expected)
    assert values[109] == pytest.approx(1e-6)


@pytest.mark.parametrize("decay, kwargs", [("cosine", {}), ("exponential", {"gamma": 1e-9}),
                                           ("exponential", {"gamma": 0.95, "steps_per_epoch": 1}),
                                           ("constant", {})])
def test_no_schedule_goes_below_min_lr_or_above_base(decay, kwargs):
    optimizer, scheduler = make(decay, warmup=3, total=50, **kwargs)
    values = lrs(optimizer, scheduler, 2000)  # far past total_steps
    assert min(values) >= 1e-6 and max(values) <= 1e-3


def test_exponential_follows_gamma_per_epoch():
    optimizer, scheduler = make("exponential", warmup=0, total=100, min_lr=1e-9, gamma=0.5, steps_per_epoch=10)
    values = lrs(optimizer, scheduler, 21)
    assert values[10] == pytest.approx(1e-9 + (1e-3 - 1e-9) * 0.5)
    assert values[20] == pytest.approx(1e-9 + (1e-3 - 1e-9) * 0.25)


def test_lr_scale_backs_off_but_keeps_the_floor():
    optimizer, scheduler = make("constant", warmup=0)
    scheduler.lr_scale = 1e-12
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 1e-6


def test_state_dict_round_trips():
    optimizer, scheduler = make()
    lrs(optimizer, scheduler, 37)
    scheduler.lr_scale = 0.5
    state = scheduler.state_dict()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    assert scheduler2.last_epoch == 37 and scheduler2.lr_scale == 0.5
    for _ in range(5):  # the restored schedule continues exactly where the first one is
        for opt, sched in ((optimizer, scheduler), (optimizer2, scheduler2)):
            opt.step()
            sched.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
