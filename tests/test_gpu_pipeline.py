"""The GPU clip pipeline's CPU twin (scheduling, grouping, caching, concurrency, order, prefetch, errors) and the
clear errors of the GPU decoding backends when something is missing. The GPU checks are in test_video_nvdec.py."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from vidssl.config import ConfigError
from vidssl.data.config import DataConfig
from vidssl.data.datasets import ClipDataset
from vidssl.data.gpu_pipeline import ClipPipeline, DecoderCache, PipelineError, group_by_file
from vidssl.data.loader import ClipLoader
from vidssl.data.manifest import VideoEntry
from vidssl.data.synthetic import decode_frame_index, frame_index_video
from vidssl.data.transforms import BatchClipAugment
from vidssl.io import write_video
from vidssl.io import video as video_mod
from vidssl.io.base import DecodeError
from vidssl.io.video import BackendUnavailableError, check_backend, open_video

AUG = DataConfig(source="video", root="x", clip_len=4, stride=2, crop_size=16, flip=0.5, color_jitter=0.3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[VideoEntry]:
    """Four index-coded videos (frame i spells i), GOP 5, different lengths."""
    root = tmp_path_factory.mktemp("pipe")
    entries = []
    for v, n in enumerate((20, 26, 17, 23)):
        path = write_video(root / f"v{v}.mp4", frame_index_video(n, 32, 48), fps=10, gop=5)
        entries.append(VideoEntry(name=f"v{v}", path=str(path), kind="video", num_frames=n))
    return entries


def dataset(entries, **kw) -> ClipDataset:
    opts = dict(clip_len=4, stride=2, clips_per_video=3, seed=7, backend="pyav")
    opts.update(kw)
    return ClipDataset(entries, **opts)


def reference_batches(ds: ClipDataset, batches: list[list[int]]) -> list[dict]:
    """The per-item path: ``load_clip`` for every item, clips augmented as a list (no pipeline)."""
    aug = BatchClipAugment.from_config(AUG)
    out = []
    for ids in batches:
        loaded = [ds.load_clip(i) for i in ids]
        params = [aug.sample_params(*c.frames.shape[:1], *c.frames.shape[2:], generator=c.generator) for c in loaded]
        out.append({"video": aug([c.frames for c in loaded], params),
                    "frames": torch.stack([torch.tensor(c.indices) for c in loaded]),
                    "video_index": torch.tensor([c.video for c in loaded]),
                    "skipped": torch.tensor([c.skipped for c in loaded])})
    return out


BATCHES = [[0, 4, 1, 9], [10, 2, 3, 5], [11, 6, 7, 8]]  # clips_per_video 3: items 0-2 read v0, 3-5 v1, ...


# ----------------------------------------------------------------------------------------------- recording readers

class Recorder:
    """``open_fn`` wrapper: counts opens per file, get_frames calls and their indices, and concurrent calls."""

    def __init__(self, open_fn, *, delay: float = 0.0, fail: dict[str, Exception] | None = None) -> None:
        self.open_fn, self.delay, self.fail = open_fn, delay, fail or {}
        self.opens: dict[str, int] = {}
        self.calls: list[tuple[str, list[int]]] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def __call__(self, path: str):
        with self.lock:
            self.opens[path] = self.opens.get(path, 0) + 1
        return RecordingReader(self, path, self.open_fn(path))


class RecordingReader:
    def __init__(self, rec: Recorder, path: str, inner) -> None:
        self.rec, self.path, self.inner = rec, path, inner
        self.num_frames = inner.num_frames
        self.keyframe_indices = getattr(inner, "keyframe_indices", None)

    def get_frames(self, indices):
        rec = self.rec
        with rec.lock:
            rec.calls.append((Path(self.path).name, list(indices)))
            rec.active += 1
            rec.max_active = max(rec.max_active, rec.active)
        try:
            if rec.delay:
                time.sleep(rec.delay)
            if Path(self.path).name in rec.fail:
                raise rec.fail[Path(self.path).name]
            return self.inner.get_frames(indices)
        finally:
            with rec.lock:
                rec.active -= 1

    def close(self) -> None:
        self.inner.close()


def pyav_open(path: str):
    return open_video(path, backend="pyav")


class SyntheticReader:
    """No decoding: frame i of a ``num_frames`` video is a constant image of value ``i`` (for timing tests)."""

    def __init__(self, path: str, num_frames: int) -> None:
        self.path, self.num_frames, self.keyframe_indices = path, num_frames, None

    def get_frames(self, indices):
        return torch.tensor(indices, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 48).contiguous()

    def close(self) -> None:
        pass


def synthetic_open(entries):
    lengths = {e.path: e.num_frames for e in entries}
    return lambda path: SyntheticReader(path, lengths[path])


def pipeline(ds, **kw) -> ClipPipeline:
    return ClipPipeline(ds, BatchClipAugment.from_config(AUG), device="cpu", **kw)


# ----------------------------------------------------------------------------------------------- output

@pytest.mark.parametrize("sessions,group_size,prefetch", [(1, None, 1), (3, None, 2), (2, 1, 3)])
def test_batches_equal_the_per_item_path(videos, sessions, group_size, prefetch):
    ds = dataset(videos)
    ref = reference_batches(dataset(videos), BATCHES)
    got = list(pipeline(ds, sessions=sessions, group_size=group_size, prefetch=prefetch, cache_size=2)
               .iterate(BATCHES))
    assert len(got) == len(ref) == 3
    for a, b, ids in zip(got, ref, BATCHES):
        assert a["index"].tolist() == ids
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["video_index"], b["video_index"])
        assert a["video"].shape == (4, 4, 3, 16, 16) and a["video"].dtype == torch.float32
        assert torch.allclose(a["video"], b["video"], atol=1e-5), (a["video"] - b["video"]).abs().max()


def test_shot_batches_carry_the_per_item_shot_fields(videos):
    """VIVI labels shots by (video, first frame): the pipeline's batches carry the CPU items' shot_ids and shots."""
    shot_entries = [dataclasses.replace(e, shots=[(0, 6), (6, 12), (12, e.num_frames)]) for e in videos]
    ds = dataset(shot_entries, sampler="shots", num_shots=2, clip_len=2, stride=1)
    got = list(pipeline(ds, sessions=2).iterate(BATCHES))
    for batch, ids in zip(got, BATCHES):
        items = [dataset(shot_entries, sampler="shots", num_shots=2, clip_len=2, stride=1)[i] for i in ids]
        assert torch.equal(batch["shot_ids"], torch.stack([it["shot_ids"] for it in items]))  # (B, K*L)
        assert torch.equal(batch["shots"], torch.stack([it["shots"] for it in items]))  # (B, K, 2)
        assert batch["shots"].shape == (4, 2, 2) and set(batch["shot_ids"].unique().tolist()) == {0, 1}


def test_frames_are_the_sampled_frames(videos):
    """Every clip holds exactly the frames its indices name (the index-coded pattern is read back)."""
    ds = dataset(videos)
    pipe = pipeline(ds, sessions=2)
    seen = []
    ds_aug = pipe.assemble
    pipe.assemble = lambda ids, loaded: (seen.extend(loaded), ds_aug(ids, loaded))[1]
    list(pipe.iterate(BATCHES))
    assert len(seen) == 12
    for clip in seen:
        assert [decode_frame_index(f) for f in clip.frames.permute(0, 2, 3, 1).numpy()] == clip.indices


def test_same_seed_same_batches_other_seed_differs(videos):
    a = list(pipeline(dataset(videos), sessions=3).iterate(BATCHES))
    b = list(pipeline(dataset(videos), sessions=2, prefetch=1).iterate(BATCHES))
    c = list(pipeline(dataset(videos, seed=8), sessions=3).iterate(BATCHES))
    assert all(torch.equal(x["video"], y["video"]) and torch.equal(x["frames"], y["frames"]) for x, y in zip(a, b))
    assert any(not torch.equal(x["frames"], z["frames"]) for x, z in zip(a, c))


# ----------------------------------------------------------------------------------------------- grouping and caching

def test_group_by_file_keeps_batch_order_and_chunks(videos):
    ds = dataset(videos)
    groups = group_by_file(ds, [4, 0, 5, 1, 2, 9], group_size=2)
    assert [(g.video, g.slots, g.items) for g in groups] == [
        (1, (0, 2), (4, 5)), (0, (1, 3), (0, 1)), (0, (4,), (2,)), (3, (5,), (9,))]
    assert groups[0].path == videos[1].path
    with pytest.raises(ValueError, match="group_size"):
        group_by_file(ds, [0], group_size=0)


def test_clips_of_one_file_are_decoded_by_one_call(videos):
    ds = dataset(videos)
    rec = Recorder(pyav_open)
    pipe = pipeline(ds, sessions=1, open_fn=rec)
    list(pipe.iterate(BATCHES))
    # batch 0 reads v0 (items 0, 1), v1 (4) and v3 (9): three calls, not four
    groups = [group_by_file(ds, b, group_size=4) for b in BATCHES]
    assert len(rec.calls) == pipe.stats.decode_calls == pipe.stats.groups == sum(map(len, groups)) == 8
    expected = []
    for batch_groups in groups:
        for g in batch_groups:
            ids = sorted({f for i in g.items for f in ds.load_clip(i).indices})
            expected.append((Path(g.path).name, ids))
    assert sorted(rec.calls) == sorted(expected)  # the union of the group's clips, sorted, once
    # one session, cache of 4: every file opened once, then reused
    assert rec.opens == {e.path: 1 for e in videos}
    assert pipe.stats.cache.opens == 4 and pipe.stats.cache.hits == 8 - 4 and pipe.stats.cache.closes == 0
    pipe.close()
    assert pipe.stats.cache.closes == 4 and pipe.stats.cache.opens == 4


class Reconfigurable:
    def __init__(self, path: str, log: list) -> None:
        self.path, self.log = path, log

    def reconfigure(self, path: str) -> None:
        self.log.append(("reconfigure", self.path, path))
        self.path = path

    def close(self) -> None:
        self.log.append(("close", self.path))


class Plain(Reconfigurable):
    reconfigure = None  # type: ignore[assignment]


def test_decoder_cache_reuses_then_reconfigures_lru():
    log: list = []
    cache = DecoderCache(lambda p: (log.append(("open", p)), Reconfigurable(p, log))[1], capacity=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # hit: a becomes the most recently used
    c = cache.get("c")  # full: b (least recently used) is pointed at c instead of a new decoder
    assert c.path == "c" and "b" not in cache and "a" in cache
    assert log == [("open", "a"), ("open", "b"), ("reconfigure", "b", "c")]
    assert (cache.stats.opens, cache.stats.hits, cache.stats.reconfigures, cache.stats.closes) == (2, 1, 1, 0)
    cache.discard("a")
    cache.close()
    assert log[-2:] == [("close", "a"), ("close", "c")] and cache.stats.closes == 2
    with pytest.raises(ValueError, match="capacity"):
        DecoderCache(lambda p: None, capacity=0)


def test_decoder_cache_without_reconfigure_closes_and_opens():
    log: list = []

    class NoReconf:
        def __init__(self, p):
            self.p = p
            log.append(("open", p))

        def close(self):
            log.append(("close", self.p))

    cache = DecoderCache(NoReconf, capacity=1)
    cache.get("a")
    cache.get("b")
    cache.get("b")
    assert log == [("open", "a"), ("close", "a"), ("open", "b")]
    assert (cache.stats.opens, cache.stats.hits, cache.stats.closes) == (2, 1, 1)


def test_files_stay_on_their_session_across_batches(videos):
    """Affinity: a file goes back to the session that has it open, so across batches each file is opened once."""
    ds = dataset(videos, clips_per_video=6)
    rec = Recorder(synthetic_open(videos))
    batches = [[k, 6 + k, 12 + k, 18 + k] for k in range(6)]  # every batch reads each file once
    pipe = pipeline(ds, sessions=2, cache_size=2, open_fn=rec)
    list(pipe.iterate(batches))
    assert rec.opens == {e.path: 1 for e in videos}
    assert pipe.stats.cache.opens == 4 and pipe.stats.cache.hits == 24 - 4 and pipe.stats.cache.reconfigures == 0


# ----------------------------------------------------------------------------------------------- concurrency, prefetch

@pytest.mark.parametrize("sessions", [1, 3])
def test_sessions_decode_concurrently(videos, sessions):
    ds = dataset(videos, clips_per_video=1)
    rec = Recorder(synthetic_open(videos), delay=0.15)
    pipe = pipeline(ds, sessions=sessions, open_fn=rec)
    list(pipe.iterate([[0, 1, 2, 3]]))
    assert rec.max_active == sessions  # one call in flight per session, never more


def test_one_file_is_spread_over_sessions(videos):
    """A batch whose clips all read one file is cut into ``ceil(batch / sessions)`` groups, decoded in parallel."""
    ds = dataset(videos, clips_per_video=8)
    rec = Recorder(synthetic_open(videos), delay=0.15)
    pipe = pipeline(ds, sessions=4, open_fn=rec)
    list(pipe.iterate([list(range(8))]))
    assert len(rec.calls) == 4 and rec.max_active == 4


def test_prefetch_runs_ahead_by_at_most_the_bound(videos):
    ds = dataset(videos, clips_per_video=6)
    batches = [[k, 6 + k, 12 + k, 18 + k] for k in range(6)] * 2
    pipe = pipeline(ds, sessions=2, prefetch=2, open_fn=synthetic_open(videos))
    for _ in pipe.iterate(batches):
        time.sleep(0.08)  # a slow training step
    ahead = [k - done for k, done in enumerate(pipe.stats.produced)]
    assert len(ahead) == 12 and max(ahead) <= 2  # never more than `prefetch` beyond the batch in use
    assert max(ahead) == 2  # and it does run ahead: batches k+1, k+2 were ready while step k ran


def own_threads(before: set) -> list[threading.Thread]:
    """Live threads started since ``before`` (a set of threads): counting all threads would see other tests'
    dropped pipelines end theirs at any time."""
    return [t for t in threading.enumerate() if t not in before]


def test_consumer_stopping_early_shuts_the_threads_down(videos):
    before = set(threading.enumerate())
    pipe = pipeline(dataset(videos), sessions=3, prefetch=1)
    for k, _ in enumerate(pipe.iterate(BATCHES * 3)):
        if k == 1:
            break
    sessions = {s._thread for s in pipe._sessions}
    assert len(sessions) == 3 and set(own_threads(before)) == sessions  # the producer is gone; the sessions stay
    assert len(list(pipe.iterate(BATCHES))) == 3  # and serve the next epoch
    pipe.close()
    deadline = time.monotonic() + 5
    while own_threads(before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not own_threads(before)


def test_a_dropped_pipeline_ends_its_threads(videos):
    """Without close(), collecting the pipeline stops its sessions: stray threads holding FFmpeg state make any later
    fork in the process unsafe (a DataLoader worker or a multiprocessing pool then hangs)."""
    pipe = pipeline(dataset(videos), sessions=2)  # the default open_fn: no bound method keeps the pipeline alive
    assert len(list(pipe.iterate(BATCHES))) == 3
    threads = [s._thread for s in pipe._sessions]
    assert all(t.is_alive() for t in threads)
    del pipe
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.is_alive() for t in threads)


def test_a_dead_producer_or_session_raises_instead_of_hanging(videos):
    pipe = pipeline(dataset(videos), sessions=1)
    pipe._produce = lambda *args: None  # ends without a batch, an end marker or an error
    with pytest.raises(PipelineError, match="producer thread ended"):
        list(pipe.iterate(BATCHES))
    s = pipe._sessions[0]
    s.stop()
    s._thread.join()
    with pytest.raises(PipelineError, match="thread ended without finishing"):
        s.result(Future(), poll=0.05)  # a job that nobody will run
    pipe.close()


# ----------------------------------------------------------------------------------------------- errors

def test_worker_error_surfaces_with_the_file_name(videos):
    ds = dataset(videos)
    rec = Recorder(pyav_open, fail={"v1.mp4": ValueError("boom in the decoder")})
    before = set(threading.enumerate())
    pipe = pipeline(ds, sessions=2, open_fn=rec)
    with pytest.raises(PipelineError, match=r"v1\.mp4.*items \[4\].*ValueError: boom in the decoder"):
        list(pipe.iterate(BATCHES))
    pipe.close()
    time.sleep(0.1)
    assert not own_threads(before)


def test_unreadable_file_is_skipped_like_the_per_item_path(videos, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00 not a video")
    entries = [videos[0], VideoEntry(name="broken", path=str(broken), kind="video", num_frames=20), videos[2]]
    batches = [[0, 3, 6], [4, 1, 7]]
    got = list(pipeline(dataset(entries), sessions=2).iterate(batches))
    ref = reference_batches(dataset(entries), batches)
    for a, b in zip(got, ref):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["video_index"], b["video_index"])
        assert torch.equal(a["skipped"], b["skipped"]) and torch.allclose(a["video"], b["video"], atol=1e-5)
    assert got[0]["skipped"].tolist() == [0, 1, 0] and got[0]["video_index"].tolist() == [0, 2, 2]


def test_bad_arguments(videos):
    ds = dataset(videos)
    for kw in ({"sessions": 0}, {"cache_size": 0}, {"prefetch": 0}, {"group_size": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            pipeline(ds, **kw)


# ----------------------------------------------------------------------------------------------- trainer wiring

def test_clip_loader_gpu_path_runs_the_pipeline(videos):
    ds = dataset(videos, reader_cache=4)
    loader = ClipLoader(ds, batch_size=4, seed=1, gpu_augment=BatchClipAugment.from_config(AUG), gpu_threads=2,
                        gpu_prefetch=1)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3 and loader.pipeline is not None
    stats = loader.pipeline.stats
    assert stats.batches == 3 and stats.cache.opens <= 4 and stats.max_ahead <= 2
    loader.set_epoch(1)
    assert len(list(loader)) == 3 and loader.pipeline is not None and loader.pipeline.stats.batches == 6
    assert loader.pipeline.stats.cache.opens == stats.cache.opens  # epoch 2 reuses the open decoders
    loader.close()
    with pytest.raises(ValueError, match="gpu_prefetch"):
        ClipLoader(ds, batch_size=4, seed=1, gpu_augment=BatchClipAugment.from_config(AUG), gpu_prefetch=0)


def test_data_config_keys():
    DataConfig(source="video", root="x", decoder="pynvvideocodec", device="cuda").validate()
    with pytest.raises(ConfigError, match="pynvvideocodec.*device=cuda"):
        DataConfig(source="video", root="x", decoder="pynvvideocodec").validate()
    with pytest.raises(ConfigError, match="gpu_prefetch"):
        DataConfig(source="video", root="x", gpu_prefetch=0).validate()


# ----------------------------------------------------------------------------------------------- missing backends

def test_missing_pynvvideocodec_is_one_clear_error(monkeypatch, videos):
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # import PyNvVideoCodec -> ImportError
    with pytest.raises(BackendUnavailableError) as e:
        open_video(videos[0].path, backend="pynvvideocodec", device="cuda")
    msg = str(e.value)
    assert "pip install 'vidssl[gpu]'" in msg and "libnvcuvid" in msg
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in msg  # everything missing, in one message
    with pytest.raises(ValueError, match="CUDA only"):
        open_video(videos[0].path, backend="pynvvideocodec", device="cpu")
    assert "pynvvideocodec" not in video_mod.available_backends(device="cuda")


def test_pynvvideocodec_library_errors_are_reported(monkeypatch):
    def broken_import(name, *a, **k):
        if name == "PyNvVideoCodec":
            raise OSError("libnvcuvid.so.1: cannot open shared object file")
        return real_import(name, *a, **k)

    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
    monkeypatch.delitem(sys.modules, "PyNvVideoCodec", raising=False)
    monkeypatch.setattr("builtins.__import__", broken_import)
    with pytest.raises(BackendUnavailableError, match="cannot load its libraries.*libnvcuvid"):
        video_mod._load_backend("pynvvideocodec")


def test_torchcodec_without_cuda_build_is_one_clear_error(monkeypatch):
    fake = types.ModuleType("torchcodec")
    fake.__version__ = "0.17.0+cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(video_mod, "_load_backend", lambda name: fake)
    monkeypatch.setitem(sys.modules, "torchcodec", fake)
    with pytest.raises(BackendUnavailableError, match="CPU-only build; install the CUDA build"):
        check_backend("torchcodec", "cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailableError, match="torch.*CPU-only build"):
        check_backend("torchcodec", "cuda")
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setattr(video_mod, "_load_backend", lambda name: (_ for _ in ()).throw(
        BackendUnavailableError("backend 'torchcodec' is not installed: pip install ...")))
    with pytest.raises(BackendUnavailableError, match="not installed"):
        check_backend("torchcodec", "cuda")


class _Status:
    def __init__(self, nvcuvid_missing: bool) -> None:
        self.status_known = True
        self._nvcuvid_unavailable = nvcuvid_missing
        self._video_not_supported = not nvcuvid_missing

    def __bool__(self) -> bool:
        return True

    def __str__(self) -> str:
        return "[CUDA] Fallback status: Falling back"


@pytest.mark.parametrize("nvcuvid_missing,error,pattern", [
    (True, BackendUnavailableError, "libnvcuvid"), (False, DecodeError, "NVDEC cannot decode this stream")])
def test_torchcodec_cpu_fallback_is_refused(monkeypatch, videos, nvcuvid_missing, error, pattern):
    """torchcodec would silently decode on the CPU; the reader raises instead, naming the file."""
    md = types.SimpleNamespace(num_frames=20, average_fps=10.0, height=32, width=48, rotation=0, codec="h264",
                               duration_seconds=2.0)
    backends = []

    @contextlib.contextmanager
    def set_cuda_backend(name):
        backends.append(name)
        yield

    class FakeDecoder:
        def __init__(self, path, **kw):
            assert kw["device"] == "cuda:0"
            self.metadata, self.cpu_fallback = md, _Status(nvcuvid_missing)

    fake = types.SimpleNamespace(VideoDecoder=FakeDecoder, set_cuda_backend=set_cuda_backend)
    monkeypatch.setattr(video_mod, "check_backend", lambda *a, **k: None)
    monkeypatch.setattr(video_mod, "_load_backend", lambda name: fake)
    with pytest.raises(error, match=pattern) as e:
        video_mod.TorchCodecReader(videos[0].path, device="cuda:0", cuda_backend="ffmpeg")
    assert videos[0].path in str(e.value) and backends == ["ffmpeg"]
    with pytest.raises(ValueError, match="cuda_backend"):
        video_mod.TorchCodecReader(videos[0].path, device="cuda:0", cuda_backend="vpf")
