"""The GPU clip pipeline: several decode sessions, decoders cached per file, clips batched per file, batched
augmentation on the device and prefetch, so decoding of batch ``k+1`` overlaps training step ``k``.

What it does for each batch of item indices (the sampler's order):

1. **Group by file.** Items that read the same video (``item // clips_per_video``) form one group, cut into chunks of
   at most ``group_size`` clips so that one file does not serialise a batch on one session. A group is decoded by
   one ``get_frames`` call over the union of its clips' frame indices (one seek serves clips that share a keyframe
   interval; torchcodec and PyNvVideoCodec decode such a call in one batch).
2. **Sessions.** ``sessions`` worker threads, each with its own :class:`DecoderCache` (readers kept open per file,
   least recently used first out; a reader that can :meth:`reconfigure` is pointed at the new file instead of being
   closed and a new one opened) and, on CUDA, its own stream. NVDEC runs one decode session per engine, so several
   sessions are what keeps several engines busy (an H100/H200 has 7). A group goes to a session that has its file
   open unless that one is ``open_penalty`` clips behind the least loaded session, which then gets it.
   Which session decodes a group never changes the output.
3. **Augment.** Clips of one size are stacked and augmented in one call of :class:`~vidssl.data.transforms.
   BatchClipAugment` (crop, flip, jitter, normalisation on the device); the producer thread has its own CUDA stream
   and hands each batch to the consumer with an event, so there is no host synchronisation per frame or per clip.
4. **Prefetch.** A producer thread assembles batches into a queue of ``prefetch`` batches: it runs at most
   ``prefetch`` batches (plus the one it is assembling) ahead of the training loop and blocks there.

Determinism: every item draws its frame indices and augmentation from its own generator (``(seed, epoch, item)``, as
:meth:`vidssl.data.datasets.ClipDataset.load_clip` does), and clips are placed by their slot in the batch, so the
batches are identical whatever ``sessions``, ``group_size`` and ``prefetch`` are, and identical to the per-item path.
A file that fails to open or decode is handed to :meth:`ClipDataset.load_clip` for its items (retries, then skipping to
the next video, counted), as the per-item path does. Any other error in a session stops the pipeline with a
:class:`PipelineError` naming the file and the items.

Everything runs with ``device="cpu"`` too (PyAV or torchcodec CPU readers, no streams): the CPU twin that the tests
use to check grouping, caching, concurrency, order and prefetch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from vidssl.data.datasets import ClipDataset, LoadedClip, item_generator
from vidssl.data.transforms import BatchClipAugment
from vidssl.io.base import DecodeError, FrameReader


class PipelineError(RuntimeError):
    """A decode session failed on a file in a way that retrying or skipping cannot handle (names the file)."""


# ---------------------------------------------------------------------------------------------------- decoder cache

@dataclass
class CacheStats:
    """What a :class:`DecoderCache` did: new readers, reconfigured readers, reuses, readers closed."""

    opens: int = 0
    reconfigures: int = 0
    hits: int = 0
    closes: int = 0

    def add(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(self.opens + other.opens, self.reconfigures + other.reconfigures, self.hits + other.hits,
                          self.closes + other.closes)


class DecoderCache:
    """Open readers of one decode session, keyed by file, at most ``capacity`` of them (LRU).

    ``get(path)`` returns the open reader of ``path``, or makes one: when the cache is full, the least recently used
    reader is reconfigured to ``path`` if it has a ``reconfigure`` method (PyNvVideoCodec: a cached hardware decoder
    instead of a new one), else closed, and a new reader is opened with ``open_fn(path)``. Used by one thread.
    """

    def __init__(self, open_fn: Callable[[str], FrameReader], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.open_fn = open_fn
        self.capacity = capacity
        self.stats = CacheStats()
        self._readers: OrderedDict[str, FrameReader] = OrderedDict()

    def __contains__(self, path: str) -> bool:
        return path in self._readers

    def get(self, path: str) -> FrameReader:
        reader = self._readers.get(path)
        if reader is not None:
            self._readers.move_to_end(path)
            self.stats.hits += 1
            return reader
        if len(self._readers) >= self.capacity:
            _, old = self._readers.popitem(last=False)
            if hasattr(old, "reconfigure"):
                try:
                    old.reconfigure(path)
                except BaseException:
                    self._close(old)
                    raise
                self.stats.reconfigures += 1
                self._readers[path] = old
                return old
            self._close(old)
        reader = self.open_fn(path)
        self.stats.opens += 1
        self._readers[path] = reader
        return reader

    def discard(self, path: str) -> None:
        """Close and forget the reader of ``path`` (after it failed)."""
        reader = self._readers.pop(path, None)
        if reader is not None:
            self._close(reader)

    def _close(self, reader: FrameReader) -> None:
        self.stats.closes += 1
        reader.close()

    def close(self) -> None:
        while self._readers:
            self._close(self._readers.popitem()[1])


# ---------------------------------------------------------------------------------------------------- grouping

@dataclass(frozen=True)
class ClipGroup:
    """Clips of one batch that read one file: ``slots`` (positions in the batch) and ``items`` (dataset indices)."""

    video: int
    path: str
    slots: tuple[int, ...]
    items: tuple[int, ...]


def group_by_file(dataset: ClipDataset, items: Sequence[int], *, group_size: int) -> list[ClipGroup]:
    """The items of one batch grouped by the video they read, in order of first appearance, each group cut into
    chunks of at most ``group_size`` clips (in batch order)."""
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    by_video: dict[int, list[tuple[int, int]]] = {}
    for slot, item in enumerate(items):
        by_video.setdefault(int(item) // dataset.clips_per_video, []).append((slot, int(item)))
    groups = []
    for v, members in by_video.items():
        for start in range(0, len(members), group_size):
            chunk = members[start:start + group_size]
            groups.append(ClipGroup(v, dataset.entries[v].path, tuple(s for s, _ in chunk), tuple(i for _, i in chunk)))
    return groups


# ---------------------------------------------------------------------------------------------------- sessions

@dataclass
class _Job:
    group: ClipGroup | None
    future: Future = field(default_factory=Future)


@dataclass
class _Decoded:
    clips: list[LoadedClip]
    event: object | None  # torch.cuda.Event recorded on the session's stream after the frames were written


class DecodeSession:
    """One decode worker: a thread, a :class:`DecoderCache` and (on CUDA) a stream of its own.

    ``submit(group)`` returns a future of the group's :class:`LoadedClip` list (frames on the device, in the order of
    ``group.items``). Jobs run one at a time, in submission order.
    """

    def __init__(self, ident: int, dataset: ClipDataset, *, device: torch.device, cache_size: int,
                 open_fn: Callable[[str], FrameReader]) -> None:
        self.ident = ident
        self.dataset = dataset
        self.device = device
        self.cache = DecoderCache(open_fn, cache_size)
        self.decode_calls = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name=f"vidssl-decode-{ident}", daemon=True)
        self._thread.start()

    def submit(self, group: ClipGroup | None) -> Future:
        """Queue ``group`` (``None``: a marker whose future completes once the jobs before it are done)."""
        job = _Job(group)
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish the queued jobs, stop the thread, close the cached readers."""
        self.stop()
        self._thread.join()

    def stop(self) -> None:
        """Ask the thread to end after its queued jobs, without waiting (safe from a garbage-collector callback)."""
        self._jobs.put(None)

    def result(self, future: Future, poll: float = 1.0):
        """``future.result()``, but a thread that died without answering raises instead of waiting for ever."""
        while True:
            try:
                return future.result(timeout=poll)
            except TimeoutError:
                if not self._thread.is_alive() and not future.done():
                    raise PipelineError(f"decode session {self.ident}: its thread ended without finishing a job")

    def _run(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if not job.future.set_running_or_notify_cancel():
                    continue
                if job.group is None:
                    job.future.set_result(None)
                    continue
                try:
                    job.future.set_result(self._decode(job.group))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, with the file named
                    g = job.group
                    err = PipelineError(f"{g.path}: decode session {self.ident} failed on items {list(g.items)}: "
                                        f"{type(e).__name__}: {e}")
                    err.__cause__ = e
                    job.future.set_exception(err)
        finally:
            self.cache.close()

    def _decode(self, group: ClipGroup) -> _Decoded:
        if self._stream is None:
            return _Decoded(self._decode_group(group), None)
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            clips = self._decode_group(group)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _Decoded(clips, event)

    def _decode_group(self, group: ClipGroup) -> list[LoadedClip]:
        ds = self.dataset
        if ds.known_bad(group.video):
            return [ds.load_clip(i) for i in group.items]  # skipped to the next video, counted
        try:
            reader = self.cache.get(group.path)
            n = reader.num_frames
            keyframes = getattr(reader, "keyframe_indices", None)
            gens = [item_generator(ds.seed, ds.epoch, i) for i in group.items]
            ids = [ds.item_indices(group.video, n, i % ds.clips_per_video, g, keyframes)
                   for i, g in zip(group.items, gens)]
            union = sorted({f for clip in ids for f in clip})
            frames = reader.get_frames(union)  # (U, 3, H, W): one call for every clip of this file
            self.decode_calls += 1
        except (DecodeError, OSError):
            self.cache.discard(group.path)
            # the per-item path: retries, then the next readable video, counted and logged
            return [ds.load_clip(i) for i in group.items]
        pos = {f: k for k, f in enumerate(union)}
        out = []
        for clip_ids, g in zip(ids, gens):
            take = torch.tensor([pos[f] for f in clip_ids], device=frames.device)
            out.append(LoadedClip(frames=frames.index_select(0, take), indices=clip_ids, generator=g,
                                  video=group.video, skipped=0))
        return out


# ---------------------------------------------------------------------------------------------------- pipeline

@dataclass
class PipelineStats:
    """Counters of one pass (for benchmarks and tests)."""

    batches: int = 0
    groups: int = 0
    decode_calls: int = 0
    cache: CacheStats = field(default_factory=CacheStats)
    #: for each batch ``k``, how many batches the consumer had finished when ``k`` was queued: ``k - produced[k]``
    #: is how far the producer ran ahead (at most ``prefetch``; one more batch may be assembled, waiting for room)
    produced: list[int] = field(default_factory=list)
    max_ahead: int = 0  #: most batches queued but not yet consumed


class ClipPipeline:
    """Batches of augmented clips from a :class:`ClipDataset` through concurrent decode sessions (module docstring).

    Args:
        dataset: the clips (``transform=None``; its readers decode on ``device``).
        augment: the batched augmentation (applied on ``device``).
        device: ``"cuda[:N]"`` (NVDEC readers, CUDA streams) or ``"cpu"`` (the CPU twin).
        sessions: concurrent decode sessions (threads); one per NVDEC engine or more.
        cache_size: open readers per session (>= 1).
        prefetch: batches assembled ahead of the consumer (>= 1).
        group_size: most clips of one file decoded by one call (default: ``ceil(batch / sessions)``).
        open_fn: ``open_fn(path) -> FrameReader``; default: :func:`vidssl.io.readers.open_reader` with the dataset's
            backend, device and threads.
        open_penalty: a session with the file already open gets the group while it is fewer than this many queued
            clips behind the least loaded session (reuse beats balance up to there).
    """

    def __init__(self, dataset: ClipDataset, augment: BatchClipAugment, *, device: str | torch.device = "cpu",
                 sessions: int = 4, cache_size: int = 4, prefetch: int = 2, group_size: int | None = None,
                 open_fn: Callable[[str], FrameReader] | None = None, open_penalty: int = 2) -> None:
        if sessions < 1 or cache_size < 1 or prefetch < 1:
            raise ValueError(f"sessions, cache_size and prefetch must be >= 1, got {sessions}, {cache_size}, "
                             f"{prefetch}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size: must be >= 1 or None, got {group_size}")
        self.dataset = dataset
        self.augment = augment
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.sessions = sessions
        self.cache_size = cache_size
        self.prefetch = prefetch
        self.group_size = group_size
        self.open_penalty = open_penalty
        # not a bound method: the session threads hold open_fn, and must not keep the pipeline alive
        self.open_fn = open_fn or functools.partial(_open_dataset_reader, dataset)
        self.stats = PipelineStats()
        self._sessions: list[DecodeSession] = []  # kept across iterate() calls (epochs): their decoders stay open
        # a pipeline dropped without close() still ends its threads (and their open decoders) when collected: a
        # process with stray threads is unsafe to fork (DataLoader workers, multiprocessing pools)
        self._finalizer = weakref.finalize(self, _stop_sessions, self._sessions)
        self._closed_calls, self._closed_cache = 0, CacheStats()  # counts of sessions already closed

    def close(self) -> None:
        """Stop the decode sessions and close their readers (a later :meth:`iterate` starts new ones)."""
        sessions = list(self._sessions)
        self._sessions.clear()  # the same list object: the finalizer holds it
        for s in sessions:
            s.close()
        self._update_stats(sessions)

    def _update_stats(self, sessions: list[DecodeSession]) -> None:
        if sessions:
            self.stats.decode_calls = self._closed_calls + sum(s.decode_calls for s in sessions)
            cache = CacheStats()
            for s in sessions:
                cache = cache.add(s.cache.stats)
            self.stats.cache = self._closed_cache.add(cache)
        if sessions and not self._sessions:  # closed: fold their counts into the base
            self._closed_calls, self._closed_cache = self.stats.decode_calls, self.stats.cache

    # -- scheduling (producer thread) ---------------------------------------------------------------------------

    def _assign(self, groups: list[ClipGroup], load: list[int], affinity: list[OrderedDict]) -> list[int]:
        """A session for every group: the least loaded session that has the file open, unless it is
        ``open_penalty`` or more clips behind the least loaded session overall, which then gets it (lowest id on
        ties). Updates ``load`` and ``affinity`` (the files each session has open, as far as the producer knows)."""
        chosen = []
        for g in groups:
            least = min(range(self.sessions), key=lambda k: (load[k], k))
            owners = [k for k in range(self.sessions) if g.path in affinity[k]]
            owner = min(owners, key=lambda k: (load[k], k)) if owners else None
            k = owner if owner is not None and load[owner] < load[least] + self.open_penalty else least
            load[k] += len(g.items)
            aff = affinity[k]
            aff[g.path] = None
            aff.move_to_end(g.path)
            while len(aff) > self.cache_size:
                aff.popitem(last=False)
            chosen.append(k)
        return chosen

    def _submit(self, batch: Sequence[int], sessions: list[DecodeSession], load: list[int],
                affinity: list[OrderedDict]) -> list[tuple[ClipGroup, Future, int]]:
        size = self.group_size or max(1, math.ceil(len(batch) / self.sessions))
        groups = group_by_file(self.dataset, batch, group_size=size)
        self.stats.groups += len(groups)
        return [(g, sessions[k].submit(g), k) for g, k in zip(groups, self._assign(groups, load, affinity))]

    def _collect(self, batch: Sequence[int], pending: list[tuple[ClipGroup, Future, int]], load: list[int],
                 stream, sessions: list[DecodeSession]) -> dict:
        loaded: list[LoadedClip | None] = [None] * len(batch)
        for group, fut, k in pending:
            decoded: _Decoded = sessions[k].result(fut)  # a PipelineError names the file
            load[k] -= len(group.items)
            if decoded.event is not None:
                stream.wait_event(decoded.event)  # the session's writes come before our reads (no host sync)
            for slot, clip in zip(group.slots, decoded.clips):
                if stream is not None:
                    clip.frames.record_stream(stream)
                loaded[slot] = clip
        return self.assemble(list(batch), loaded)  # type: ignore[arg-type]

    def assemble(self, batch_ids: list[int], loaded: list[LoadedClip]) -> dict:
        """One batch dict from decoded clips: same-size clips stacked and augmented together on the device."""
        params = []
        for clip in loaded:
            t, _, h, w = clip.frames.shape
            params.append(self.augment.sample_params(t, h, w, generator=clip.generator))
        by_size: dict[tuple, list[int]] = {}
        for slot, clip in enumerate(loaded):
            by_size.setdefault(tuple(clip.frames.shape), []).append(slot)
        video = None
        for slots in by_size.values():
            clips = torch.stack([loaded[s].frames.to(self.device) for s in slots])  # (b, T, 3, H, W)
            out = self.augment(clips, [params[s] for s in slots])  # (b, T, 3, S, S) float32
            if video is None:
                video = out.new_empty((len(loaded), *out.shape[1:]))
            video[torch.tensor(slots, device=out.device)] = out
        batch = {"video": video,
                 "index": torch.tensor(batch_ids, dtype=torch.int64),
                 "frames": torch.stack([torch.tensor(c.indices, dtype=torch.int64) for c in loaded]),
                 "skipped": torch.tensor([c.skipped for c in loaded], dtype=torch.int64),
                 "video_index": torch.tensor([c.video for c in loaded], dtype=torch.int64)}
        if getattr(self.dataset, "sampler", "") == "shots":  # the shot fields of the CPU items, stacked
            fields = [self.dataset.shot_fields(c.video, c.indices) for c in loaded]
            batch.update({k: torch.stack([f[k] for f in fields]) for k in ("shot_ids", "shots")})  # (B, K*L), (B, K, 2)
        return batch

    def _produce(self, batches: list[list[int]], out: queue.Queue, stop: threading.Event,
                 sessions: list[DecodeSession], consumed: list[int]) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        load = [0] * self.sessions
        affinity: list[OrderedDict] = [OrderedDict() for _ in range(self.sessions)]
        try:
            with torch.cuda.device(self.device) if stream is not None else contextlib.nullcontext(), \
                    torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                pending = self._submit(batches[0], sessions, load, affinity) if batches else []
                for k, batch in enumerate(batches):
                    if stop.is_set():
                        return
                    current = pending
                    # decode the next batch's groups while this one is collected and augmented
                    pending = self._submit(batches[k + 1], sessions, load, affinity) if k + 1 < len(batches) else []
                    item = self._collect(batch, current, load, stream, sessions)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    while not stop.is_set():
                        try:
                            out.put((item, event), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    else:
                        return
                    self.stats.produced.append(consumed[0])
                    self.stats.batches += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            out.put((e, None))
            return
        out.put((None, None))

    # -- consumer ----------------------------------------------------------------------------------------------

    def iterate(self, batches: Iterable[Sequence[int]]) -> Iterator[dict]:
        """Batches for the item indices of ``batches`` (each a list of dataset indices), in that order.

        The decode sessions (and their open decoders) outlive the call, for the next epoch; :meth:`close` ends
        them."""
        batches = [list(b) for b in batches]
        if not self._sessions:
            self._sessions.extend(DecodeSession(k, self.dataset, device=self.device, cache_size=self.cache_size,
                                                open_fn=self.open_fn) for k in range(self.sessions))
        sessions = list(self._sessions)
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        consumed = [0]
        producer = threading.Thread(target=self._produce, args=(batches, out, stop, sessions, consumed),
                                    name="vidssl-batches", daemon=True)
        producer.start()
        try:
            while True:
                try:
                    item, event = out.get(timeout=1.0)
                except queue.Empty:
                    if producer.is_alive() or not out.empty():
                        continue
                    raise PipelineError("the batch producer thread ended without a result or an error") from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    item["video"].record_stream(current)
                self.stats.max_ahead = max(self.stats.max_ahead, self.stats.batches - consumed[0])
                yield item
                consumed[0] += 1
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    out.get(timeout=0.05)  # unblock a producer waiting on a full queue
                except queue.Empty:
                    pass
            producer.join()
            self._drain(sessions)
            self._update_stats(sessions)

    @staticmethod
    def _drain(sessions: list[DecodeSession]) -> None:
        """Wait until every session has finished its queued jobs (those of batches nobody will consume)."""
        for s in sessions:
            s.result(s.submit(None))


def _open_dataset_reader(ds: ClipDataset, path: str) -> FrameReader:
    """The default ``open_fn``: :func:`vidssl.io.readers.open_reader` with the dataset's backend, device, threads."""
    from vidssl.io.readers import open_reader

    return open_reader(path, backend=ds.backend, device=ds.device, threads=ds.decode_threads)


def _stop_sessions(sessions: list[DecodeSession]) -> None:
    """Finalizer of a :class:`ClipPipeline`: end its sessions' threads (they close their readers on the way out)."""
    for s in sessions:
        s.stop()

