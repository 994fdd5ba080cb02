"""Launched by tests/test_distributed.py under torchrun (2 processes, Gloo): per-rank random streams.

Writes DDP_TEST_DUMP/rank<R>.pt with: the DataLoader worker seed of this rank (num_workers=1), the
draws after a checkpoint payload is taken, the draws after restoring that payload (same-size resume),
and the draws after restoring DDP_TEST_DUMP/one.pt (a 1-process payload). Rank 0 also saves its
payload as two.pt.
"""

import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_enhanced_adaptivestream as T  # noqa: E402
from config import load_config  # noqa: E402
from data import build_loaders  # noqa: E402

DUMP = Path(os.environ["DDP_TEST_DUMP"])


class Seeds(torch.utils.data.Dataset):
    """Each item is the torch seed of the process that loads it (the DataLoader worker)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"seed": torch.initial_seed()}


def draws():
    return {"torch": torch.rand(4), "numpy": torch.from_numpy(np.random.rand(4)), "python": random.random()}


def main():
    cfg = load_config(sys.argv[1:])
    run_dir = Path(cfg.out_dir)
    run = T.build_run(cfg, run_dir)
    loader, _ = build_loaders(load_config(sys.argv[1:] + ["--num-workers", "1"]), Seeds(), Seeds(), run.device,
                              run.rank, run.world_size)
    worker_seed = int(next(iter(loader))["seed"][0])
    del loader
    payload = T.checkpoint_payload(run)  # a collective under torchrun: every rank takes part
    saved = draws()
    if run.rank == 0:  # as a checkpoint: rank 0 writes the file, every rank resumes from it
        torch.save(payload, DUMP / "two.pt")
    torch.distributed.barrier()
    T.seed_everything(12345)  # lose the stream; restoring must bring it back
    T.restore_training_state(run, torch.load(DUMP / "two.pt", weights_only=True))
    restored = draws()
    T.restore_training_state(run, torch.load(DUMP / "one.pt", weights_only=True))
    from_one = draws()
    torch.save({"worker_seed": worker_seed, "saved": saved, "restored": restored, "from_one": from_one},
               DUMP / f"rank{run.rank}.pt")
    torch.distributed.destroy_process_group()


main()
