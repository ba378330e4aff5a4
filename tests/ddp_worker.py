"""Run by tests/test_ddp.py (SGD: Adam's g/sqrt(v) would amplify float round-off in near-zero gradients) under torchrun (or directly for the single-process twin).

Usage: python ddp_worker.py OUT_DIR  — trains a tiny CRW with a deterministic sharded in-memory loader.
"""

import os
import sys

import torch

from vidssl.engine import resolve_run_config, train


class ShardedLoader:
    """Global batch of 4 clips per step, split over ranks the way DistributedSampler splits (rank r: r::world)."""

    def __init__(self, rank, world, global_batch=4, num_clips=8):
        g = torch.Generator().manual_seed(0)
        self.clips = torch.rand(num_clips, 3, 3, 32, 32, generator=g)
        self.rank, self.world, self.global_batch, self.epoch, self.skipped = rank, world, global_batch, 0, 0

    def set_epoch(self, e):
        self.epoch = e

    def __len__(self):
        return len(self.clips) // self.global_batch

    def __iter__(self):
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(self.epoch))
        for b in range(len(self)):
            idx = order[b * self.global_batch:(b + 1) * self.global_batch][self.rank::self.world]
            yield {"video": self.clips[idx]}


#: the tiny CRW run both twins train (the test rebuilds its initial weights from these)
OVERRIDES = [
    "model.out_layer=layer2", "model.eval_layer=layer2", "model.norm=group", "data.clip_len=3",
    "objectives.0.patch_size=16", "objectives.0.patch_stride=8", "objectives.0.edge_dropout=0.0",
    "objectives.0.patch_jitter=null", "train.batch_size=4", "train.steps=3", "optim.name=sgd", "optim.lr=0.05",
    "optim.momentum=0.9", "train.device=cpu"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = resolve_run_config(None, OVERRIDES)
    train(cfg, sys.argv[1], loader=ShardedLoader(rank, world), progress=False, echo=False)
