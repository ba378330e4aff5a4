"""Several named data streams feeding one training run.

The main stream (the recipe's ``data:`` section) yields a batch on every step; a further stream with mixing weight
``w < 1`` yields one on a fraction ``w`` of the steps. Whether stream ``name`` is drawn at step ``k`` is a pure
function of ``(seed, name, k)`` (:func:`stream_drawn`), the same on every process, so a resumed or distributed run
follows the same schedule; a :class:`StreamCursor` then reopens each loader at the batch it had reached.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator


def stream_drawn(seed: int, name: str, step: int, weight: float) -> bool:
    """Does stream ``name`` contribute a batch at ``step``? (Bernoulli(``weight``) from a hash, no RNG state.)"""
    if weight >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}:{name}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < weight


def batches_drawn(seed: int, name: str, steps: int, weight: float) -> int:
    """Batches stream ``name`` has yielded in steps ``0 .. steps-1``."""
    if weight >= 1:
        return steps
    return sum(stream_drawn(seed, name, k, weight) for k in range(steps))


class StreamCursor:
    """Endless batches of one loader, epoch after epoch, starting after ``position`` batches already drawn.

    ``loader`` needs ``len()``, ``set_epoch(e)`` and iteration (a :class:`~vidssl.data.ClipLoader`). Reopening at
    ``position`` gives the batches an uninterrupted run would have drawn next (the skipped ones of a partly done
    epoch are read and dropped, as the samplers are not seekable).
    """

    def __init__(self, loader: Any, position: int = 0) -> None:
        self.loader = loader
        self.per_epoch = len(loader)
        if self.per_epoch == 0:
            raise ValueError("the data loader yields no batch: fewer items than its batch size")
        self.position = position
        self.epoch, skip = divmod(position, self.per_epoch)
        self._it = self._open(self.epoch)
        for _ in range(skip):
            next(self._it)

    def _open(self, epoch: int) -> Iterator[dict]:
        self.loader.set_epoch(epoch)
        return iter(self.loader)

    def __iter__(self) -> "StreamCursor":
        return self

    def __next__(self) -> dict:
        while True:
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch += 1
                self._it = self._open(self.epoch)
                continue
            self.position += 1
            return batch


__all__ = ["StreamCursor", "batches_drawn", "stream_drawn"]
