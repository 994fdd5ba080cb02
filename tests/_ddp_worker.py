"""Launched by tests/test_distributed.py under torchrun: the real main(), plus a per-rank dump of the
final weights and skip counters, and optional fault injection on rank 1 only.

DDP_TEST_DUMP: folder for rank<R>.pt; DDP_TEST_INJECT: comma-separated "inf:<call>" (an inf gradient
on rank 1: DDP's gradient all-reduce spreads it to rank 0 by itself), "loss:<call>" (a NaN loss on rank 1
whose gradients stay finite: only the guard's verdict all-reduce can tell rank 0) or "verdict:<call>"
(rank 1 alone judges the step bad), by 0-based train_step call.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_enhanced_adaptivestream as T  # noqa: E402

RANK = int(os.environ["RANK"])
DUMP = Path(os.environ["DDP_TEST_DUMP"])
INJECT = dict(item.split(":")[::-1] for item in os.environ.get("DDP_TEST_INJECT", "").split(",") if item)

original_fit, original_step, calls = T.fit, T.train_step, []


def fit(run):
    try:
        return original_fit(run)
    finally:
        weights = {k: v.detach().cpu() for k, v in T.unwrap(run.model).named_parameters()}
        torch.save({"weights": weights, "skipped": run.state.skipped}, DUMP / f"rank{RANK}.pt")


def step(run, images, masks, labels):
    kind = INJECT.get(str(len(calls))) if RANK == 1 else None
    calls.append(1)
    if kind == "inf":
        handle = T.unwrap(run.model).seg_head.bias.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            return original_step(run, images, masks, labels)
        finally:
            handle.remove()
    if kind == "loss":
        honest_loss = run.loss_fn

        def nan_loss(*args):
            total, parts = honest_loss(*args)
            return total + torch.tensor(float("nan"), device=total.device), parts  # a constant: no gradient

        run.loss_fn = nan_loss
        try:
            return original_step(run, images, masks, labels)
        finally:
            run.loss_fn = honest_loss
    if kind == "verdict":
        honest = run.guard.reason
        run.guard.reason = lambda loss, norm: torch.full_like(honest(loss, norm), 3)
        try:
            return original_step(run, images, masks, labels)
        finally:
            del run.guard.reason
    return original_step(run, images, masks, labels)


T.fit, T.train_step = fit, step
sys.exit(T.main(sys.argv[1:]))
