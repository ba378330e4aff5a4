"""Run by tests/test_contrastive.py: two gloo ranks, forked from this script, each take their shard of a fixed global
batch, compute the contrastive losses with ``gather=True`` and save losses, gradients, queue, bank and batch-shuffle
results to ``OUT_DIR/rank{r}.pt``. The test computes the single-process twin over the concatenated batch.

Usage: python contrastive_ddp_worker.py OUT_DIR
"""

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vidssl.losses import (MemoryBank, MoCoQueue, batch_shuffle, batch_unshuffle, cmc_loss, in_batch_scores, info_nce,
                           npair_loss, nt_xent)

WORLD, BATCH, DIN, DIM = 2, 3, 5, 4  # BATCH rows per rank

#: loss of embeddings (z_a, z_b), each (B, D), with or without cross-rank candidates
CASES = {
    "nt_xent": lambda a, b, gather: nt_xent(a, b, temperature=0.5, gather=gather)[0],
    "info_nce": lambda a, b, gather: info_nce(*in_batch_scores(a, b, temperature=0.5, normalize=True,
                                                               gather=gather))[0],
    "cmc": lambda a, b, gather: cmc_loss(a, b, temperature=0.5, gather=gather)[0],
    "npair": lambda a, b, gather: npair_loss(a, b, l2_reg=0.1, gather=gather)[0],
}


def global_inputs() -> dict[str, torch.Tensor]:
    """The global batch ``x_a, x_b (WORLD * BATCH, DIN)``, a shared projection ``w (DIN, DIM)``, queue/bank seeds."""
    g = torch.Generator().manual_seed(0)
    return {"x_a": torch.randn(WORLD * BATCH, DIN, generator=g), "x_b": torch.randn(WORLD * BATCH, DIN, generator=g),
            "w": torch.randn(DIN, DIM, generator=g), "bank_idx": torch.randperm(10, generator=g)[:WORLD * BATCH]}


def run_case(loss_fn, inputs: dict[str, torch.Tensor], rows: slice, gather: bool):
    """Loss and gradients w.r.t. ``w`` and the rows' inputs, for embeddings ``z = x @ w``."""
    w = inputs["w"].clone().requires_grad_()
    x_a = inputs["x_a"][rows].clone().requires_grad_()
    x_b = inputs["x_b"][rows].clone().requires_grad_()
    loss = loss_fn(x_a @ w, x_b @ w, gather)
    loss.backward()
    return loss.detach(), w.grad, x_a.grad, x_b.grad


def worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    inputs = global_inputs()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for name, loss_fn in CASES.items():
        loss, w_grad, xa_grad, xb_grad = run_case(loss_fn, inputs, rows, gather=True)
        dist.all_reduce(loss)  # DDP: the mean of the ranks' losses and of their parameter gradients
        dist.all_reduce(w_grad)
        out[name] = {"loss": loss / WORLD, "w_grad": w_grad / WORLD, "x_a_grad": xa_grad, "x_b_grad": xb_grad}
    keys = torch.nn.functional.normalize(inputs["x_a"][rows, :DIM], dim=1)  # (BATCH, DIM) this rank's keys
    queue = MoCoQueue(DIM, 4 * WORLD * BATCH, generator=torch.Generator().manual_seed(1))
    for _ in range(5):  # wraps around after 4
        queue.dequeue_and_enqueue(keys)
    bank = MemoryBank(10, DIM, momentum=0.3, generator=torch.Generator().manual_seed(2))
    bank.update(inputs["bank_idx"][rows], keys)
    shuffled, idx_unshuffle = batch_shuffle(inputs["x_a"][rows], generator=torch.Generator().manual_seed(rank))
    out["state"] = {"queue": queue.queue, "queue_ptr": queue.queue_ptr, "bank": bank.bank, "shuffled": shuffled,
                    "idx_unshuffle": idx_unshuffle, "unshuffled": batch_unshuffle(shuffled, idx_unshuffle)}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # fork: the children reuse this process's torch import (nothing has run on the intra-op thread pool yet)
    mp.start_processes(worker, args=(sys.argv[1], free_port()), nprocs=WORLD, start_method="fork")
