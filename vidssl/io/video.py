"""Encoded-video readers: one interface over PyAV, torchcodec (CPU and CUDA/NVDEC) and decord.

``open_video(path)`` returns a :class:`~vidssl.io.base.FrameReader`: ``num_frames``, ``fps``, ``height``, ``width``
and ``get_frames(indices) -> uint8 (T, 3, H, W)`` RGB on the reader's device. ``T = len(indices)``; indices may come
in any order and repeat. The returned tensor has that shape, but its memory may be channels-last (a permuted view of
the decoder's ``(T, H, W, 3)`` buffer): call ``.contiguous()`` where a kernel needs it.

Frame index ``i`` is the ``i``-th frame in presentation order (the ``i``-th smallest presentation timestamp), the
same on every backend: B-frames, NTSC rates (30000/1001) and variable frame rates are read through the stream's own
timestamps, never through ``i / fps``. Rotation metadata (display matrix) is applied, so frames come out upright and
``height``/``width`` are the displayed size; ``rotation`` reports the angle that was applied (degrees
counter-clockwise, as torchcodec and FFmpeg report it).

Open one reader per ``__getitem__`` (readers are cheap to open and hold an FFmpeg decoder that must not be shared
between DataLoader worker processes), use it as a context manager or call ``close()``.

Backends
--------
``pyav`` (core dependency)
    Implemented here. The container is opened without FFmpeg's stream probing (~0.3 ms instead of ~12 ms at 480p;
    formats that need probing are reopened with it). ``seek_mode="exact"`` reads the packet timestamps once at open
    (no decoding, ~1-2 ms for a 10-s 480p file) to map frame indices to timestamps and to know the keyframes;
    ``"approximate"`` trusts the header (frame count, constant rate) and skips the scan. A read seeks to the keyframe
    at or before the first wanted frame, decodes forward, and converts to RGB only the frames returned. Requested
    indices are sorted and grouped so one seek serves a clip; a new seek happens only when it saves decoding. Frames
    that are neither wanted nor referenced by other frames (non-reference B-frames of the lead-in and between strided
    frames) are skipped by the decoder (``skip_nonref=True``), and once every packet up to the last wanted frame is
    in the decoder it is drained instead of fed further packets (the output is identical, verified by the tests).
``torchcodec`` (extra ``vidssl[torchcodec]``; needs FFmpeg shared libraries 4-8)
    ``torchcodec.decoders.VideoDecoder(num_ffmpeg_threads=threads, seek_mode=..., device=...)``; ``device="cuda"``
    decodes on NVDEC (torchcodec's ``"nvdec"`` CUDA backend by default, ``cuda_backend="ffmpeg"`` for FFmpeg's
    CUDA hwaccel) and returns CUDA tensors; one batched ``get_frames_at`` per read, NVDEC decoders reused through
    torchcodec's own cache (same codec and size). torchcodec falls back to CPU decoding when NVDEC cannot take a
    stream; vidssl checks its ``cpu_fallback`` status and raises instead (no silent CPU decoding). Open such readers
    in the main process, not in DataLoader workers.
``pynvvideocodec`` (extra ``vidssl[gpu]``; NVIDIA's wheel ``pynvvideocodec``, CUDA only)
    :class:`PyNvVideoCodecReader`: ``PyNvVideoCodec.SimpleDecoder`` (random access by index, batched
    ``get_batch_frames_by_index``, RGB conversion on the GPU, its own LRU of hardware decoders), frames handed to
    torch by DLPack on the reader's CUDA stream; :meth:`PyNvVideoCodecReader.reconfigure` points an open decoder at
    another file (a cached hardware decoder is reused instead of creating one).
``decord`` (extra ``vidssl[decord]``; unmaintained since 2021)
    ``decord.VideoReader(num_threads=threads).get_batch``.

``pyav`` with ``device="cuda"``
    NVDEC through the CUDA hwaccel of the FFmpeg inside PyAV's wheels; frames stay on the GPU (DLPack) and are
    converted NV12 -> RGB there (:mod:`vidssl.io.color`, swscale's conventions); same seeking and frame indexing.

``backend="auto"`` picks the first available of :data:`AUTO_ORDER` (CPU) or :data:`AUTO_ORDER_CUDA` (CUDA).
"""

from __future__ import annotations

import bisect
import os
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from einops import rearrange

from vidssl.io.base import DecodeError

BACKENDS: tuple[str, ...] = ("pyav", "torchcodec", "decord", "pynvvideocodec")

#: Backends that decode on CUDA only.
CUDA_ONLY: tuple[str, ...] = ("pynvvideocodec",)

# "auto" takes the first available backend of this order on CPU. Measured with tools/bench_decode.py --quick on the
# 2-core development machine (shared, load ~6; random clips, one decoder per clip, one thread; CPU ms per clip,
# lower is better): 480p GOP 30 8x1: vidssl-pyav 47, vidssl-decord 68, vidssl-torchcodec 102 (torchcodec 0.17 on
# Debian's FFmpeg 5.1); 480p GOP 30 16x2: 91 / 131 / 191; 480p GOP 250 8x1: 127 / 211 / 248; 720p GOP 30 8x1:
# 81 / 136 / 107; 720p GOP 250 8x1: 239 / 383 / 362. vidssl's PyAV reader was fastest on every pattern because it
# opens without FFmpeg's stream probing (~10 ms per open otherwise), skips non-reference frames it does not return
# and converts only the returned frames. After it decord and torchcodec are mixed (decord ahead on 3 of 5
# patterns); torchcodec comes second as the maintained official decoder with the CUDA path, decord (unmaintained
# since 2021) last. PyAV is a core dependency, so "auto" means PyAV unless it is broken.
AUTO_ORDER: tuple[str, ...] = ("pyav", "torchcodec", "decord")

# "auto" with device="cuda" (NVDEC): PyAV's FFmpeg hwaccel first, because PyAV's wheels carry an FFmpeg built with
# NVDEC and the core dependency suffices; torchcodec's NVDEC needs its CUDA build (download.pytorch.org wheels).
# torchcodec's NVDEC and PyNvVideoCodec come after it until tools/gpu_benchmark.sh has measured them on a GPU (not yet).
AUTO_ORDER_CUDA: tuple[str, ...] = ("pyav", "torchcodec", "pynvvideocodec")

#: What NVDEC needs from the system, whichever library calls it.
NVCUVID_HINT = ("NVDEC needs the NVIDIA driver's libnvcuvid.so.1 (installed with the driver; containers: "
                "NVIDIA_DRIVER_CAPABILITIES must include 'video')")

INSTALL_HINTS: dict[str, str] = {
    "pyav": "pip install av",
    "torchcodec": (
        "pip install 'vidssl[torchcodec]' (torchcodec matching your torch) and FFmpeg 4-8 shared libraries "
        "(Debian/Ubuntu: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 "
        "libavfilter8 libavdevice59, or conda install ffmpeg)"
    ),
    "decord": "pip install 'vidssl[decord]'",
    "pynvvideocodec": (
        "pip install 'vidssl[gpu]' (NVIDIA's pynvvideocodec wheel); " + NVCUVID_HINT
    ),
}

SeekMode = Literal["exact", "approximate"]


class BackendUnavailableError(ImportError):
    """A decoding backend was asked for but is not installed (or cannot load its libraries)."""


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _check_path(path: str | os.PathLike) -> str:
    """The path as ``str`` after checking that it names a non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video file not found: {p}")
    if p.is_dir():
        raise DecodeError(f"{p}: is a folder, not a video file (frame folders are read by vidssl.io.frames)")
    if p.stat().st_size == 0:
        raise DecodeError(f"{p}: empty file (0 bytes), not a video")
    return str(p)


def _check_options(*, threads: int, seek_mode: str, device: str | torch.device) -> torch.device:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads: expected an int >= 0 (0 = let FFmpeg choose), got {threads!r}")
    if seek_mode not in ("exact", "approximate"):
        raise ValueError(f"seek_mode: expected 'exact' or 'approximate', got {seek_mode!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e


def _check_indices(indices: Sequence[int], num_frames: int, path: str) -> list[int]:
    """Indices as a list of Python ints, each in ``[0, num_frames)``; negative indices are not accepted."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{path}: frame indices must be ints, got {i!r}")
        i = int(i)
        if not 0 <= i < num_frames:
            raise IndexError(f"{path}: frame index {i} out of range for a video of {num_frames} frames")
        out.append(i)
    return out


def _reorder(frames: torch.Tensor, unique_sorted: list[int], wanted: list[int]) -> torch.Tensor:
    """``frames[k]`` holds frame ``unique_sorted[k]``; return the frames in the order (and repeats) of ``wanted``."""
    if wanted == unique_sorted:
        return frames
    pos = {f: k for k, f in enumerate(unique_sorted)}
    return frames[torch.tensor([pos[i] for i in wanted], device=frames.device)]


def _rotate_thwc(frames: torch.Tensor, rotation: int) -> torch.Tensor:
    """Rotate ``frames: (T, H, W, C)`` by ``rotation`` degrees counter-clockwise (a multiple of 90)."""
    k = (rotation // 90) % 4
    return torch.rot90(frames, k=k, dims=(1, 2)) if k else frames


def _normalise_rotation(angle: float | None) -> int:
    """Angle in degrees rounded to a multiple of 90 in ``{0, 90, 180, 270}``."""
    if angle is None or angle != angle:  # None or NaN
        return 0
    return int(round(angle / 90.0)) % 4 * 90


def _import_av():
    try:
        import av
    except ImportError as e:  # av is a core dependency; still say what to do
        raise BackendUnavailableError(f"backend 'pyav' needs PyAV: {INSTALL_HINTS['pyav']}") from e
    return av


def available_backends(*, device: str | torch.device = "cpu") -> list[str]:
    """Backends that can decode here, in :data:`AUTO_ORDER`; for ``device="cuda"`` only those that decode on the GPU.

    torchcodec counts only when its FFmpeg libraries load (it imports without them); CUDA additionally needs a
    visible GPU.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return []
    names = []
    for name in (AUTO_ORDER_CUDA if dev.type == "cuda" else AUTO_ORDER):
        try:
            check_backend(name, dev)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def _load_backend(name: str) -> Any:
    """Import a backend's module (raises :class:`BackendUnavailableError` with the install hint when missing)."""
    if name == "pyav":
        return _import_av()
    if name == "torchcodec":
        try:
            import torchcodec.decoders as tcd
        except ImportError as e:
            raise BackendUnavailableError(
                f"backend 'torchcodec' is not installed: {INSTALL_HINTS['torchcodec']}") from e
        try:  # importing torchcodec succeeds without FFmpeg; loading its core library does not
            from torchcodec._internally_replaced_utils import load_core_libraries
        except ImportError:  # layout of another torchcodec release: the first decode will tell
            return tcd
        try:
            load_core_libraries()
        except Exception as e:  # noqa: BLE001 - torchcodec raises RuntimeError/OSError variants
            raise BackendUnavailableError(
                f"backend 'torchcodec' is installed but cannot load its FFmpeg libraries: {INSTALL_HINTS['torchcodec']}"
            ) from e
        return tcd
    if name == "decord":
        # decord 0.6 ships zlib 1.2.3 and loads it globally: torchvision's PNG decoder must be loaded first, or every
        # later PNG decode fails ("libpng error: bad parameters to zlib") or crashes the process.
        import torchvision.io  # noqa: F401

        try:
            import decord
        except ImportError as e:
            raise BackendUnavailableError(f"backend 'decord' is not installed: {INSTALL_HINTS['decord']}") from e
        return decord
    if name == "pynvvideocodec":
        try:
            import PyNvVideoCodec as nvc
        except ImportError as e:
            raise BackendUnavailableError(
                f"backend 'pynvvideocodec' is not installed: {INSTALL_HINTS['pynvvideocodec']}") from e
        except OSError as e:  # the module is there but a shared library (libnvcuvid, libcuda) is not
            raise BackendUnavailableError(
                f"backend 'pynvvideocodec' is installed but cannot load its libraries ({e}): "
                f"{INSTALL_HINTS['pynvvideocodec']}") from e
        return nvc
    raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")


def _torchcodec_cuda_problem() -> str | None:
    """Why this torchcodec cannot decode on CUDA (``None`` when nothing is known to be missing)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; torchcodec's NVDEC needs torch's CUDA build"
    try:
        import torchcodec
    except ImportError:
        return None  # reported by _load_backend
    version = str(getattr(torchcodec, "__version__", ""))
    if version.endswith("+cpu"):
        return (f"torchcodec {version} is a CPU-only build; install the CUDA build matching torch "
                f"{torch.__version__} (e.g. pip install torchcodec --index-url https://download.pytorch.org/whl/"
                f"cu{torch.version.cuda.replace('.', '')})")
    return None


def check_backend(name: str, device: str | torch.device = "cpu") -> None:
    """Raise one :class:`BackendUnavailableError` listing everything ``name`` lacks to decode on ``device``.

    Checks, in this order, and reports all that fail in one message: the library (and its FFmpeg or driver
    libraries), a visible CUDA GPU when ``device`` is CUDA, and for torchcodec a CUDA build. A CPU-only backend asked
    for CUDA, or a CUDA-only backend asked for the CPU, is a ``ValueError``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and name == "decord":
        raise ValueError(f"backend 'decord' decodes on CPU only; use 'pyav', 'torchcodec' or 'pynvvideocodec' for "
                         f"device={str(dev)!r}")
    if dev.type != "cuda" and name in CUDA_ONLY:
        raise ValueError(f"backend {name!r} decodes on CUDA only (device='cuda'); got device={str(dev)!r}")
    problems: list[str] = []
    try:
        _load_backend(name)
    except BackendUnavailableError as e:
        problems.append(str(e))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"device={str(dev)!r} asked for but no CUDA GPU is visible (torch.cuda.is_available() is "
                            "False: no GPU, no NVIDIA driver, or a CPU-only torch)")
        if name == "torchcodec":
            why = _torchcodec_cuda_problem()
            if why:
                problems.append(why)
        if name == "pyav" and torch.cuda.is_available() and not nvdec_available():
            problems.append("PyAV's FFmpeg was built without the CUDA hwaccel (NVDEC); PyAV's own wheels have it")
    if problems:
        raise BackendUnavailableError(f"backend {name!r} on {str(dev)!r} cannot decode here: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# PyAV


def nvdec_available() -> bool:
    """True when PyAV's FFmpeg has the CUDA hwaccel and a CUDA GPU is visible (NVDEC through :class:`PyAVReader`)."""
    if not torch.cuda.is_available():
        return False
    try:
        av = _import_av()
        from av.codec.hwaccel import hwdevices_available
    except ImportError:
        return False
    return "cuda" in hwdevices_available()


def _nvdec_hwaccel(device: torch.device, path: str) -> Any:
    """PyAV hwaccel settings for NVDEC on ``device``, sharing PyTorch's (primary) CUDA context."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"{path}: device={str(device)!r} asked for but no CUDA GPU is visible")
    try:
        from av.codec.hwaccel import HWAccel, hwdevices_available
    except ImportError as e:
        raise BackendUnavailableError(f"{path}: this PyAV has no hardware decoding (PyAV >= 14 needed)") from e
    if "cuda" not in hwdevices_available():
        raise BackendUnavailableError(f"{path}: PyAV's FFmpeg was built without the CUDA hwaccel (NVDEC)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()  # create PyTorch's primary context first; FFmpeg then uses it (primary_ctx)
    return HWAccel(device_type="cuda", device=str(index), allow_software_fallback=False, is_hw_owned=True,
                   options={"primary_ctx": "1"})


class _ClosingReader:
    """``with reader:`` closes it at the end (readers define ``close``); the checks every ``get_frames`` starts with."""

    def _request(self, handle: object, indices: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(indices checked, their sorted unique values)``; a closed reader (``handle`` None) is an error."""
        if handle is None:
            raise DecodeError(f"{self.path}: reader is closed")
        idx = _check_indices(indices, self.num_frames, self.path)
        return idx, sorted(set(idx))

    def _no_frames(self) -> torch.Tensor:
        return torch.empty((0, 3, self.height, self.width), dtype=torch.uint8, device=self.device)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Overshoot(Exception):
    """A seek landed after the wanted frame (internal; handled by seeking earlier)."""


class PyAVReader:
    """Frame-accurate random access through PyAV (see the module docstring for the algorithm).

    Args:
        path: video file.
        threads: FFmpeg decoder threads (``1`` inside DataLoader workers; ``0`` = FFmpeg's choice).
        thread_type: ``"SLICE"`` (default; safe in forked workers), ``"FRAME"`` or ``"AUTO"``; used when
            ``threads != 1``.
        seek_mode: ``"exact"`` (scan packet timestamps at open) or ``"approximate"`` (trust the header).
        skip_nonref: let the decoder drop non-reference frames that are not returned (same output, less work).
        device: ``"cpu"``, or ``"cuda[:N]"`` to decode on NVDEC through FFmpeg's CUDA hwaccel (PyAV's wheels ship an
            FFmpeg built with it): frames stay in GPU memory (DLPack), are converted NV12 -> RGB there
            (:func:`vidssl.io.color.nv12_to_rgb`) and come back as CUDA tensors. 8-bit 4:2:0 streams only; a stream
            NVDEC cannot decode raises :class:`DecodeError` (no silent CPU fallback). Open such readers in the main
            process.
    """

    backend = "pyav"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int = 1,
        thread_type: str = "SLICE",
        seek_mode: SeekMode = "exact",
        skip_nonref: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        self._container = None
        self.device = _check_options(threads=threads, seek_mode=seek_mode, device=device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {str(self.device)!r}")
        self._hwaccel = None
        if thread_type not in ("SLICE", "FRAME", "AUTO"):
            raise ValueError(f"thread_type: expected 'SLICE', 'FRAME' or 'AUTO', got {thread_type!r}")
        self.path = _check_path(path)
        self._threads, self._thread_type = threads, thread_type
        self.seek_mode = seek_mode
        self.skip_nonref = skip_nonref
        self._av = _import_av()
        if self.device.type == "cuda":
            self._hwaccel = _nvdec_hwaccel(self.device, self.path)
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
        self._open_container(probe_streams=False)
        try:
            self._read_metadata()
        except BaseException:
            self.close()
            raise
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()  # one swscale context reused for every frame of this reader
        self._packets: Iterator | None = None
        self._next_index: int | None = None  # index of the next frame forward decoding yields; None = unknown
        self._after_seek = False
        self._seq_count = 0
        self._seek_key: int | None = None  # frame index the last seek aimed at (a keyframe in exact mode)
        self._sent: set[int] = set()  # indices of the packets sent to the decoder since that seek

    # -- opening ---------------------------------------------------------------------------------------------

    def _open_container(self, *, probe_streams: bool) -> None:
        av = self._av
        # FFmpeg's stream probing (avformat_find_stream_info) decodes and reads ahead to fill in what a header lacks;
        # mp4/mkv/webm headers hold everything needed. ``skip_frame=all`` (a decoder option handed to the probing)
        # and ``probesize=32`` make the open ~0.3 ms instead of ~12 ms at 480p. Containers whose streams are only
        # known after decoding (raw H.264, some MPEG-TS) come back without a frame size and are reopened with full
        # probing.
        options = None if probe_streams else {"skip_frame": "all", "probesize": "32"}
        try:
            if self._hwaccel is not None:
                self._container = av.open(self.path, options=options, hwaccel=self._hwaccel)
            else:
                self._container = av.open(self.path, options=options)
        except av.error.FFmpegError as e:
            raise DecodeError(f"{self.path}: not a readable video (corrupt, truncated or not a video): {e}") from e
        except OSError as e:
            raise DecodeError(f"{self.path}: cannot be opened: {e}") from e
        videos = self._container.streams.video
        if not videos:
            self.close()
            raise DecodeError(f"{self.path}: contains no video stream")
        self._stream = videos[0]
        if not probe_streams and (not self._stream.width or not self._stream.height):
            self._container.close()
            self._open_container(probe_streams=True)
            return
        cc = self._stream.codec_context
        if cc is not None:
            cc.thread_count = self._threads
            cc.thread_type = "SLICE" if self._threads == 1 else self._thread_type

    def _read_metadata(self) -> None:
        s = self._stream
        self._time_base: Fraction = s.time_base or Fraction(1, 1)
        if not s.width or not s.height:
            raise DecodeError(f"{self.path}: video stream has no frame size (corrupt header?)")
        self._coded_hw = (int(s.height), int(s.width))
        # the container's average rate; without one (e.g. MPEG-TS opened without probing) exact mode derives it from
        # the timestamps and approximate mode falls back to FFmpeg's guess (r_frame_rate, which can be the field rate)
        self._rate: Fraction | None = Fraction(s.average_rate) if s.average_rate else None
        if self._rate is None and self.seek_mode == "approximate":
            guess = s.guessed_rate or s.base_rate
            self._rate = Fraction(guess) if guess else None
        self.codec = s.codec_context.name if s.codec_context is not None else None
        if s.codec_context is None:
            raise DecodeError(f"{self.path}: no decoder for codec of the video stream")
        self._header_frames = int(s.frames or 0)
        self._rotation: int | None = None
        self._sequential = False
        self.keyframe_indices: list[int] | None = None
        if self.seek_mode == "exact":
            self._scan()
        else:
            self._header_mapping()
        if self.num_frames == 0:
            raise DecodeError(f"{self.path}: contains no video frames")
        self.fps = float(self._rate) if self._rate else None
        if s.duration is not None:
            self.duration = float(s.duration * self._time_base)
        elif self._container.duration is not None:
            self.duration = self._container.duration / 1_000_000
        elif self.fps:
            self.duration = self.num_frames / self.fps
        else:
            self.duration = None

    def _scan(self) -> None:
        """Read every packet's timestamps (no decoding): exact frame count, index -> pts, keyframes."""
        pts: list[int] = []
        key_pts: list[int] = []
        n_nopts = n_discard = 0
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:
                    continue  # the empty packet that signals the end
                if getattr(packet, "is_discard", False):
                    n_discard += 1
                    continue
                if packet.pts is None:
                    n_nopts += 1
                    continue
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
        except self._av.error.FFmpegError as e:
            raise DecodeError(f"{self.path}: corrupt or truncated container (error while reading packets: {e})") from e
        present = len(pts) + n_nopts + n_discard
        if self._header_frames and present < self._header_frames:
            raise DecodeError(
                f"{self.path}: truncated or incomplete file: the header lists {self._header_frames} frames but only "
                f"{present} are present"
            )
        if n_nopts:
            # No usable timestamps (raw streams, some AVI): frame i is the i-th decoded frame from the start.
            self._sequential = True
            self._frame_pts = None
            self._index_of_pts = None
            self.num_frames = len(pts) + n_nopts
            return
        frame_pts = sorted(set(pts))
        if len(frame_pts) != len(pts):
            warnings.warn(f"{self.path}: {len(pts) - len(frame_pts)} packets share a timestamp; duplicates ignored")
        self._frame_pts = frame_pts
        self._index_of_pts = {p: i for i, p in enumerate(frame_pts)}
        self.num_frames = len(frame_pts)
        self.keyframe_indices = sorted(self._index_of_pts[p] for p in set(key_pts))
        if self._rate is None and len(frame_pts) > 1:
            span = (frame_pts[-1] - frame_pts[0]) * self._time_base
            self._rate = Fraction(len(frame_pts) - 1) / span if span else None

    def _header_mapping(self) -> None:
        """Approximate mode: constant rate from the header, frame count from the header (or duration x rate)."""
        s = self._stream
        if self._rate is None:
            raise DecodeError(f"{self.path}: no frame rate in the header; use seek_mode='exact'")
        self._start_pts = s.start_time if s.start_time is not None else 0
        self._frame_pts = None
        self._index_of_pts = None
        n = self._header_frames
        if not n and s.duration:
            n = int(round(s.duration * self._time_base * self._rate))
        if not n and self._container.duration:
            n = int(round(Fraction(self._container.duration, 1_000_000) * self._rate))
        self.num_frames = n

    # -- geometry (rotation is known once a frame has been decoded) ------------------------------------------

    @property
    def rotation(self) -> int:
        """Display rotation in degrees counter-clockwise (0, 90, 180, 270) applied to returned frames."""
        if self._rotation is None:
            self._probe_rotation()
        return self._rotation  # type: ignore[return-value]

    @property
    def height(self) -> int:
        return self._coded_hw[1] if self.rotation in (90, 270) else self._coded_hw[0]

    @property
    def width(self) -> int:
        return self._coded_hw[0] if self.rotation in (90, 270) else self._coded_hw[1]

    def _probe_rotation(self) -> None:
        """Decode the first frame to read its display matrix (PyAV exposes it on frames only)."""
        self.get_frames([0])

    # -- decoding --------------------------------------------------------------------------------------------

    def _index_of(self, pts: int | None) -> int | None:
        """Frame index of a presentation timestamp (None when unknown)."""
        if pts is None:
            return None
        if self._index_of_pts is not None:
            return self._index_of_pts.get(pts)
        return int(round((pts - self._start_pts) * self._time_base * self._rate))

    def _frame_index(self, frame) -> int | None:
        if self._sequential:
            i = self._seq_count
            self._seq_count += 1
            return i
        return self._index_of(frame.pts)

    def _pts_of(self, index: int) -> int:
        if self._frame_pts is not None:
            return self._frame_pts[index]
        return self._start_pts + int(round(Fraction(index) / self._rate / self._time_base))

    def _seek(self, index: int) -> None:
        """Position the demuxer so that forward decoding starts at a keyframe at or before frame ``index``."""
        if self._sequential:
            self._restart()
            return
        try:
            self._container.seek(self._pts_of(index), stream=self._stream, backward=True, any_frame=False)
        except self._av.error.FFmpegError:
            self._restart()
            return
        self._packets = self._container.demux(self._stream)
        self._next_index = None
        self._after_seek = True
        self._seek_key = index
        self._sent = set()

    def _restart(self) -> None:
        """Back to the first packet: reopen (works for streams that cannot seek)."""
        self._container.close()
        self._open_container(probe_streams=False)
        self._packets = self._container.demux(self._stream)
        self._next_index = None
        self._after_seek = True
        self._seq_count = 0
        self._seek_key = 0 if not self._sequential else None
        self._sent = set()

    def _seek_target(self, index: int, attempt: int) -> int:
        """Frame to seek to for ``index`` on the given retry: its keyframe, then earlier ones, then the start."""
        if self.keyframe_indices:
            n = bisect.bisect_right(self.keyframe_indices, index)  # keyframes <= index
            return self.keyframe_indices[n - 1 - attempt] if attempt < n else 0
        step = int(self._rate or 30) * 2 ** attempt if attempt else 0
        return max(0, index - step)

    def _need_seek(self, index: int) -> bool:
        if self._next_index is None or self._packets is None or index < self._next_index:
            return True
        if self.keyframe_indices:
            n = bisect.bisect_right(self.keyframe_indices, index)
            return n > 0 and self.keyframe_indices[n - 1] > self._next_index
        return index - self._next_index > 2 * int(self._rate or 30)

    def _take(self, frames, target: int, wanted: set[int], out: dict[int, np.ndarray]) -> bool:
        """Record decoded ``frames``; convert the wanted ones. True once frame ``target`` has been passed."""
        finished = False
        for frame in frames:
            i = self._frame_index(frame)
            if i is None:
                continue
            if self._after_seek:
                self._after_seek = False
                if i > target:
                    raise _Overshoot
            if self._rotation is None:
                self._rotation = _normalise_rotation(getattr(frame, "rotation", 0))
            self._next_index = i + 1
            if i in wanted and i not in out:
                if self._hwaccel is not None:
                    out[i] = self._gpu_rgb(frame)
                else:
                    out[i] = self._reformatter.reformat(frame, format="rgb24").to_ndarray()
            if i >= target:
                finished = True
        return finished

    def _decode_until(self, target: int, wanted: set[int], out: dict[int, np.ndarray], *, last: bool) -> None:
        """Decode forward until frame ``target`` has been produced, converting every wanted frame met on the way.

        For the ``last`` target of a read (exact mode), once every packet of the frames from the seek keyframe to
        ``target`` has been sent, the decoder is drained (end of stream) instead of being fed further packets just
        to push the reordered frames out; the next read then seeks.
        """
        cc = self._stream.codec_context
        skip = self.skip_nonref and not self._sequential
        can_drain = last and self._index_of_pts is not None and self._seek_key is not None \
            and self._seek_key <= target
        pending = -1
        if can_drain:
            key = self._seek_key
            pending = target - key + 1 - sum(1 for j in self._sent if key <= j <= target)
        av_err = self._av.error.FFmpegError
        while True:
            if pending == 0:  # everything up to the target is in the decoder already
                packet, i = None, None
            else:
                try:
                    packet = next(self._packets)  # type: ignore[arg-type]
                except StopIteration:
                    packet = None
                except av_err as e:
                    raise DecodeError(f"{self.path}: corrupt data while reading frame {target}: {e}") from e
                if packet is not None and packet.size == 0:
                    packet = None  # PyAV's end-of-stream marker: flush the decoder
                i = self._index_of(packet.pts) if packet is not None else None
            if skip:
                cc.skip_frame = "DEFAULT" if (i is None or i in wanted) else "NONREF"
            try:
                finished = self._take(cc.decode(packet), target, wanted, out)
                drain = False
                if i is not None and i not in self._sent:
                    self._sent.add(i)
                    if can_drain and key <= i <= target:
                        pending -= 1
                        drain = pending == 0 and not finished
                if drain:
                    if skip:
                        cc.skip_frame = "DEFAULT"
                    finished = self._take(cc.decode(None), target, wanted, out)
                    packet = None
            except av_err as e:
                raise DecodeError(f"{self.path}: corrupt data while decoding towards frame {target}: {e}") from e
            if packet is None:  # drained: the decoder needs a seek before it takes packets again
                self._packets = None
                self._next_index = None
                break
            if finished:
                break
        if target not in out:
            raise DecodeError(
                f"{self.path}: frame {target} of {self.num_frames} could not be decoded (corrupt or truncated data)"
            )

    def _gpu_rgb(self, frame) -> torch.Tensor:
        """An NVDEC frame (NV12 in GPU memory, exported by DLPack) -> ``uint8 (H, W, 3)`` RGB on ``self.device``."""
        from vidssl.io.color import matrix_for_colorspace, nv12_to_rgb

        sw = getattr(frame, "sw_format", None)
        sw_name = getattr(sw, "name", sw)
        if frame.format.name != "cuda" or sw_name != "nv12":
            raise DecodeError(
                f"{self.path}: NVDEC returned a {frame.format.name}/{sw_name} frame; the CUDA path reads 8-bit 4:2:0 "
                "(nv12) only: decode this file on the CPU (data.device=cpu) or re-encode it (tools/prepare_videos.py)")
        h, w = frame.height, frame.width
        # PyAV exports without stream semantics: wait for FFmpeg's copy into the surface (all streams), then take
        # the planes as DLPack capsules
        torch.cuda.synchronize(self.device)
        y = torch.from_dlpack(frame.planes[0].__dlpack__(stream=None))         # (>=H, >=W) uint8, pitched
        uv = torch.from_dlpack(frame.planes[1].__dlpack__(stream=None))        # (>=H/2, >=W) or (.., .., 2)
        if uv.dim() == 3:
            uv = rearrange(uv, "h w c -> h (w c)")
        if uv.dtype != torch.uint8:  # exported as 16-bit Cb/Cr pairs: the same bytes
            uv = uv.contiguous().view(torch.uint8)
        hc, wc = (h + 1) // 2, (w + 1) // 2
        rgb = nv12_to_rgb(y[:h, :w], uv[:hc, : 2 * wc], matrix=matrix_for_colorspace(frame.colorspace),
                          full_range=int(frame.color_range) == 2)               # (H, W, 3) new memory
        # the decoder recycles its surfaces: the conversion must have read this one before the next decode
        torch.cuda.current_stream(self.device).synchronize()
        return rgb

    def _decode_sorted(self, unique: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        wanted = set(unique)
        for target in unique:
            if target in out:
                continue
            attempt = 0
            while True:
                if self._need_seek(target):
                    self._seek(self._seek_target(target, attempt))
                try:
                    self._decode_until(target, wanted, out, last=target == unique[-1])
                    break
                except _Overshoot:
                    attempt += 1
                    self._next_index = None
                    if attempt > len(self.keyframe_indices or []) + 8:
                        raise DecodeError(f"{self.path}: cannot seek to frame {target}") from None
        return out

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (any order, repeats allowed) as ``uint8 (len(indices), 3, H, W)`` RGB on
        ``self.device``."""
        if self._container is None:
            raise DecodeError(f"{self.path}: reader is closed")
        idx = _check_indices(indices, self.num_frames, self.path)
        if not idx:
            return torch.empty((0, 3, self.height, self.width), dtype=torch.uint8, device=self.device)
        unique = sorted(set(idx))
        decoded = self._decode_sorted(unique)
        if self._hwaccel is not None:
            arr = torch.stack([decoded[i] for i in unique])  # (U, H, W, 3) on the GPU
        else:
            arr = torch.from_numpy(np.stack([decoded[i] for i in unique]))  # (U, H, W, 3)
        arr = _rotate_thwc(arr, self._rotation or 0)
        return rearrange(_reorder(arr, unique, idx), "t h w c -> t c h w")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        self._packets = None

    def __enter__(self) -> "PyAVReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        dev = f", device={str(self.device)!r}" if self._hwaccel is not None else ""
        return f"PyAVReader({self.path!r}, num_frames={self.num_frames}, fps={self.fps}{dev})"


# ----------------------------------------------------------------------------------------------------------------
# torchcodec


class TorchCodecReader(_ClosingReader):
    """Frames through ``torchcodec.decoders.VideoDecoder`` (CPU, or NVDEC with ``device="cuda"``).

    Args:
        path: video file.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        threads: FFmpeg threads (CPU decoding only).
        seek_mode: ``"exact"`` (scan at open) or ``"approximate"`` (header only; faster to open).
        cuda_backend: ``device="cuda"`` only: ``"nvdec"`` (torchcodec's direct NVDEC interface with its decoder
            cache; the default) or ``"ffmpeg"`` (FFmpeg's CUDA hwaccel inside torchcodec).

    A CUDA reader whose stream NVDEC cannot decode (torchcodec would silently decode it on the CPU) raises:
    :class:`BackendUnavailableError` when the driver's ``libnvcuvid`` is missing, :class:`DecodeError` when this
    stream is not supported by NVDEC; both name the file.
    """

    backend = "torchcodec"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        threads: int = 1,
        seek_mode: SeekMode = "exact",
        cuda_backend: str = "nvdec",
    ) -> None:
        self._dec = None
        self.device = _check_options(threads=threads, seek_mode=seek_mode, device=device)
        self.path = _check_path(path)
        self.seek_mode = seek_mode
        if cuda_backend not in ("nvdec", "ffmpeg"):
            raise ValueError(f"cuda_backend: expected 'nvdec' or 'ffmpeg', got {cuda_backend!r}")
        self.cuda_backend = cuda_backend if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            try:
                check_backend("torchcodec", self.device)
            except BackendUnavailableError as e:
                raise BackendUnavailableError(f"{self.path}: {e}") from None
            self.device = torch.device("cuda", self.device.index if self.device.index is not None
                                       else torch.cuda.current_device())
        tcd = _load_backend("torchcodec")
        self._fallback_checked = self.device.type != "cuda"
        try:
            with self._cuda_backend_context(tcd):
                self._dec = tcd.VideoDecoder(
                    self.path,
                    seek_mode=seek_mode,
                    num_ffmpeg_threads=threads,
                    device=str(self.device),
                    dimension_order="NCHW",
                )
            md = self._dec.metadata
        except (RuntimeError, ValueError) as e:
            if self.device.type == "cuda" and any(w in str(e) for w in ("CUDA", "cuda", "NVDEC", "nvcuvid", "device")):
                raise BackendUnavailableError(
                    f"{self.path}: torchcodec could not create a CUDA decoder ({e}); "
                    f"{INSTALL_HINTS['torchcodec']}") from e
            raise DecodeError(f"{self.path}: not a readable video (corrupt, truncated or not a video): {e}") from e
        if not self._fallback_checked:
            self._check_fallback()  # the nvdec backend knows at creation; the ffmpeg one after the first frame
        n = md.num_frames
        if not n:
            raise DecodeError(f"{self.path}: contains no video frames")
        header = getattr(md, "num_frames_from_header", None)
        content = getattr(md, "num_frames_from_content", None)
        if seek_mode == "exact" and header and content is not None and content < header:
            raise DecodeError(
                f"{self.path}: truncated or incomplete file: the header lists {header} frames but only {content} are "
                f"present"
            )
        self.num_frames = int(n)
        self.fps = float(md.average_fps) if md.average_fps else None
        self.height = int(md.height)
        self.width = int(md.width)
        self.rotation = _normalise_rotation(getattr(md, "rotation", None))
        self.codec = md.codec
        self.duration = md.duration_seconds
        self.keyframe_indices: list[int] | None = None

    def _cuda_backend_context(self, tcd):
        """torchcodec's ``set_cuda_backend`` for CUDA readers (a no-op context otherwise)."""
        import contextlib

        if self.cuda_backend is None:
            return contextlib.nullcontext()
        setter = getattr(tcd, "set_cuda_backend", None)
        if setter is None:
            if self.cuda_backend != "nvdec":
                raise BackendUnavailableError(
                    f"{self.path}: this torchcodec has no set_cuda_backend (cuda_backend={self.cuda_backend!r} needs "
                    "torchcodec >= 0.8)")
            return contextlib.nullcontext()
        return setter(self.cuda_backend)

    def _check_fallback(self) -> None:
        """Refuse torchcodec's silent CPU fallback on a CUDA reader (status known: checked once)."""
        status = getattr(self._dec, "cpu_fallback", None)
        if status is None:  # a torchcodec without fallback reporting: nothing to check
            self._fallback_checked = True
            return
        if not getattr(status, "status_known", True):
            return
        self._fallback_checked = True
        if bool(status):
            if getattr(status, "_nvcuvid_unavailable", False):
                raise BackendUnavailableError(
                    f"{self.path}: torchcodec cannot load NVDEC (libnvcuvid.so.1 from the NVIDIA driver); it would "
                    f"decode on the CPU instead ({status}); {NVCUVID_HINT}")
            raise DecodeError(
                f"{self.path}: NVDEC cannot decode this stream (torchcodec: {status}); decode it on the CPU "
                "(device='cpu') or re-encode it to 8-bit H.264/HEVC 4:2:0 (tools/prepare_videos.py)")

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` as ``uint8 (len(indices), 3, H, W)`` RGB on ``self.device``."""
        idx, unique = self._request(self._dec, indices)
        if not idx:
            return self._no_frames()
        try:
            frames = self._dec.get_frames_at(indices=unique).data
        except (RuntimeError, ValueError, IndexError) as e:
            raise DecodeError(f"{self.path}: could not decode frames {unique[:4]}...: {e}") from e
        if not self._fallback_checked:
            self._check_fallback()
        return _reorder(frames, unique, idx)

    def close(self) -> None:
        self._dec = None

    def __repr__(self) -> str:
        return f"TorchCodecReader({self.path!r}, num_frames={self.num_frames}, device={str(self.device)!r})"


# ----------------------------------------------------------------------------------------------------------------
# PyNvVideoCodec


class PyNvVideoCodecReader(_ClosingReader):
    """Frames through NVIDIA's ``PyNvVideoCodec.SimpleDecoder`` on NVDEC (CUDA only).

    Args:
        path: video file (a seekable container: mp4, mkv, mov, avi; not a raw elementary stream).
        device: ``"cuda[:N]"``.
        seek_mode: ``"exact"`` (the decoder scans the stream for its frame count) or ``"approximate"`` (header).
        decoder_cache_size: hardware decoders PyNvVideoCodec keeps for :meth:`reconfigure` (LRU, per reader).

    Frames are converted to RGB by PyNvVideoCodec on the GPU and handed to torch by DLPack. The decoder works on a
    CUDA stream of its own; reads make the caller's current stream wait for it (no host synchronisation) and copy
    the frames out before the decoder may reuse its surfaces. Rotation metadata is read with PyAV at open (PyAV
    decodes the first frame on the CPU for it, since the display matrix is only exposed on frames) and applied.
    """

    backend = "pynvvideocodec"

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cuda", seek_mode: SeekMode = "exact",
                 decoder_cache_size: int = 4) -> None:
        self._dec = None
        dev = _check_options(threads=1, seek_mode=seek_mode, device=device)
        self.path = _check_path(path)
        try:
            check_backend("pynvvideocodec", dev)
        except BackendUnavailableError as e:
            raise BackendUnavailableError(f"{self.path}: {e}") from None
        if decoder_cache_size < 1:
            raise ValueError(f"decoder_cache_size: must be >= 1, got {decoder_cache_size}")
        self._nvc = _load_backend("pynvvideocodec")
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.seek_mode = seek_mode
        self.keyframe_indices: list[int] | None = None
        self._rotations: dict[str, int] = {}
        self._stream = torch.cuda.Stream(self.device)  # the decoder's own stream (0 would make it create one)
        try:
            self._dec = self._nvc.SimpleDecoder(
                self.path, gpu_id=self.device.index, cuda_stream=self._stream.cuda_stream, use_device_memory=True,
                need_scanned_stream_metadata=seek_mode == "exact", decoder_cache_size=decoder_cache_size,
                output_color_type=self._nvc.OutputColorType.RGB)
        except Exception as e:  # noqa: BLE001 - PyNvVideoCodec raises plain Exception / RuntimeError variants
            raise DecodeError(f"{self.path}: PyNvVideoCodec cannot open it (corrupt, not a video, or a stream NVDEC "
                              f"does not decode): {e}") from e
        self._read_metadata()

    def _read_metadata(self) -> None:
        md = self._dec.get_stream_metadata()
        n = len(self._dec)
        if not n:
            raise DecodeError(f"{self.path}: contains no video frames (or is an elementary stream, which "
                              "PyNvVideoCodec's SimpleDecoder cannot index)")
        self.num_frames = int(n)
        fps = float(getattr(md, "average_fps", 0) or 0)
        self.fps = fps or None
        coded_h, coded_w = int(getattr(md, "height")), int(getattr(md, "width"))
        self.codec = getattr(md, "codec_name", None)
        self.duration = float(getattr(md, "duration", 0) or 0) or None
        if self.path not in self._rotations:
            with PyAVReader(self.path, seek_mode="approximate") as probe:
                self._rotations[self.path] = probe.rotation
        self.rotation = self._rotations[self.path]
        self.height, self.width = (coded_w, coded_h) if self.rotation in (90, 270) else (coded_h, coded_w)

    def reconfigure(self, path: str | os.PathLike) -> None:
        """Point this reader at another file, reusing a cached hardware decoder (no new decoder session)."""
        if self._dec is None:
            raise DecodeError(f"{self.path}: reader is closed")
        new = _check_path(path)
        self._stream.synchronize()  # the decoder's pending work belongs to the old file
        try:
            self._dec.reconfigure_decoder(new)
        except Exception as e:  # noqa: BLE001
            raise DecodeError(f"{new}: PyNvVideoCodec cannot reconfigure to it: {e}") from e
        self.path = new
        self._read_metadata()

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` as ``uint8 (len(indices), 3, H, W)`` RGB on ``self.device`` (channels-last view)."""
        idx, unique = self._request(self._dec, indices)
        if not idx:
            return self._no_frames()
        consumer = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(consumer)  # earlier copies out of the decoder's surfaces are done first
        try:
            with torch.cuda.stream(self._stream):
                decoded = self._dec.get_batch_frames_by_index(unique)
                if len(decoded) != len(unique):
                    raise DecodeError(f"{self.path}: PyNvVideoCodec returned {len(decoded)} of the {len(unique)} "
                                      f"frames asked for ({unique[:4]}...)")
                frames = torch.stack([torch.from_dlpack(f) for f in decoded])  # (U, H, W, 3), our memory
        except DecodeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DecodeError(f"{self.path}: PyNvVideoCodec could not decode frames {unique[:4]}...: {e}") from e
        consumer.wait_stream(self._stream)
        frames.record_stream(consumer)
        frames = _rotate_thwc(frames, self.rotation)
        return rearrange(_reorder(frames, unique, idx), "t h w c -> t c h w")

    def close(self) -> None:
        self._dec = None

    def __repr__(self) -> str:
        return f"PyNvVideoCodecReader({self.path!r}, num_frames={self.num_frames}, device={str(self.device)!r})"


# ----------------------------------------------------------------------------------------------------------------
# decord


class DecordReader(_ClosingReader):
    """Frames through ``decord.VideoReader`` (CPU). decord applies rotation metadata itself."""

    backend = "decord"
    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        _check_options(threads=threads, seek_mode="exact", device="cpu")
        self.path = _check_path(path)
        decord = _load_backend("decord")
        try:
            self._vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=threads)
            n = len(self._vr)
        except Exception as e:  # noqa: BLE001 - decord raises its own DECORDError (a RuntimeError subclass)
            raise DecodeError(f"{self.path}: not a readable video (corrupt, truncated or not a video): {e}") from e
        if n == 0:
            raise DecodeError(f"{self.path}: contains no video frames")
        self.num_frames = int(n)
        fps = self._vr.get_avg_fps()
        self.fps = float(fps) if fps and fps == fps else None
        self._hw: tuple[int, int] | None = None
        self.keyframe_indices: list[int] | None = None

    @property
    def height(self) -> int:
        if self._hw is None:
            self.get_frames([0])
        return self._hw[0]  # type: ignore[index]

    @property
    def width(self) -> int:
        if self._hw is None:
            self.get_frames([0])
        return self._hw[1]  # type: ignore[index]

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` as ``uint8 (len(indices), 3, H, W)`` RGB on CPU."""
        if self._vr is None:
            raise DecodeError(f"{self.path}: reader is closed")
        idx = _check_indices(indices, self.num_frames, self.path)
        unique = sorted(set(idx))
        if not unique:
            return torch.empty((0, 3, self.height, self.width), dtype=torch.uint8)
        try:
            arr = torch.from_numpy(self._vr.get_batch(unique).asnumpy())  # (U, H, W, 3)
        except Exception as e:  # noqa: BLE001 - DECORDError
            raise DecodeError(
                f"{self.path}: decord could not decode frames {unique[:4]}...: {e} (decord 0.6 fails on some rotated "
                f"videos; backend='pyav' or 'torchcodec' reads them)"
            ) from e
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise DecodeError(f"{self.path}: decord returned frames of shape {tuple(arr.shape)}, expected (T, H, W, 3)")
        self._hw = (int(arr.shape[1]), int(arr.shape[2]))
        return rearrange(_reorder(arr, unique, idx), "t h w c -> t c h w")

    def close(self) -> None:
        self._vr = None

    def __repr__(self) -> str:
        return f"DecordReader({self.path!r}, num_frames={self.num_frames})"


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def resolve_backend(backend: str = "auto", *, device: str | torch.device = "cpu") -> str:
    """The concrete backend name ``open_video`` would use (``"auto"`` resolved; missing backends raise)."""
    dev = torch.device(device)
    if backend == "auto":
        if dev.type == "cuda":
            names = available_backends(device=dev)
            if not names:
                raise BackendUnavailableError(
                    f"no NVDEC decoder for device={str(dev)!r}: needs a visible CUDA GPU and one of PyAV's FFmpeg with "
                    f"the CUDA hwaccel, torchcodec's CUDA build ({INSTALL_HINTS['torchcodec']}) or PyNvVideoCodec "
                    f"({INSTALL_HINTS['pynvvideocodec']})")
            return names[0]
        for name in AUTO_ORDER:
            try:
                _load_backend(name)
                return name
            except BackendUnavailableError:
                continue
        raise BackendUnavailableError(f"no video decoding backend is installed: {INSTALL_HINTS['pyav']}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    check_backend(backend, dev)
    return backend


def open_video(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    threads: int = 1,
    seek_mode: SeekMode = "exact",
    thread_type: str = "SLICE",
    cuda_backend: str = "nvdec",
):
    """Open an encoded video file for frame-accurate random access.

    Args:
        path: video file (mp4, mkv, webm, avi, ...). Frame folders are opened by ``vidssl.io.frames``.
        backend: ``"auto"``, ``"pyav"``, ``"torchcodec"``, ``"decord"`` or ``"pynvvideocodec"`` (CUDA only).
        device: ``"cpu"``, or ``"cuda[:N]"`` for NVDEC decoding (PyAV's FFmpeg hwaccel, torchcodec's CUDA build or
            PyNvVideoCodec).
        threads: decoder threads (default 1: parallelism comes from DataLoader workers; 0 = FFmpeg's choice).
        seek_mode: ``"exact"`` (frame count and index -> timestamp map from a packet scan at open) or
            ``"approximate"`` (from the header; faster to open, may be off on variable-frame-rate files).
        thread_type: PyAV only: ``"SLICE"`` (default, safe inside forked workers), ``"FRAME"`` or ``"AUTO"``.
        cuda_backend: torchcodec on CUDA only: ``"nvdec"`` (default) or ``"ffmpeg"`` (see :class:`TorchCodecReader`).

    Returns:
        a :class:`~vidssl.io.base.FrameReader`; ``get_frames(indices) -> uint8 (T, 3, H, W)`` RGB on ``device``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DecodeError: not a video, no video stream, zero frames, truncated or corrupt, or (CUDA) a stream NVDEC cannot
            decode (the message names the file).
        BackendUnavailableError: the backend, its FFmpeg or driver libraries, or the GPU is missing; one message says
            everything that is missing and what to install. Never a silent fallback to CPU decoding.
        ValueError: an unknown backend / seek_mode / device, a CPU-only backend asked for CUDA or a CUDA-only
            backend asked for the CPU.
    """
    dev = _check_options(threads=threads, seek_mode=seek_mode, device=device)
    _check_path(path)
    name = resolve_backend(backend, device=dev)
    if name == "pyav":
        return PyAVReader(path, threads=threads, thread_type=thread_type, seek_mode=seek_mode, device=dev)
    if name == "torchcodec":
        return TorchCodecReader(path, device=dev, threads=threads, seek_mode=seek_mode, cuda_backend=cuda_backend)
    if name == "pynvvideocodec":
        return PyNvVideoCodecReader(path, device=dev, seek_mode=seek_mode)
    return DecordReader(path, threads=threads)


def probe_video(path: str | os.PathLike) -> dict:
    """Metadata of a video file, read with PyAV (packet scan, plus one decoded frame for the rotation).

    Returns:
        ``{"path", "num_frames", "fps", "height", "width", "codec", "duration", "rotation", "keyframes"}`` where
        ``height``/``width`` are the displayed size (after rotation), ``keyframes`` the keyframe frame indices (or
        ``None`` when the stream has no timestamps) and ``duration`` seconds (or ``None``).
    """
    with PyAVReader(path, seek_mode="exact") as r:
        return {
            "path": r.path,
            "num_frames": r.num_frames,
            "fps": r.fps,
            "height": r.height,
            "width": r.width,
            "codec": r.codec,
            "duration": r.duration,
            "rotation": r.rotation,
            "keyframes": list(r.keyframe_indices) if r.keyframe_indices is not None else None,
        }
