"""NVDEC path of the PyAV reader: the GPU colour conversion (tested on CPU against swscale) and, with a GPU, the
decoded frames against the CPU reader."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from av.video.reformatter import Interpolation  # noqa: E402

from vidssl.data.synthetic import decode_frame_index, frame_index_video  # noqa: E402
from vidssl.io import write_video  # noqa: E402
from vidssl.io import open_video  # noqa: E402
from vidssl.io.color import matrix_for_colorspace, nv12_to_rgb, yuv_to_rgb  # noqa: E402
from vidssl.io.video import BackendUnavailableError, nvdec_available, resolve_backend  # noqa: E402


def _planes(frame) -> list[torch.Tensor]:
    """A CPU frame's planes as uint8 tensors, row padding cut (NV12's chroma plane is 2 bytes per pixel)."""
    bytes_per_px = 2 if frame.format.name == "nv12" else 1
    out = []
    for k, p in enumerate(frame.planes):
        width = p.width * (bytes_per_px if k == 1 else 1)
        a = np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :width]
        out.append(torch.from_numpy(a.copy()))
    return out


def _textured_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus blocks of saturated colour: both the matrix and chroma edges are exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, 3)
    return img.round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("colorspace,matrix", [("ITU601", "bt601"), ("ITU709", "bt709")])
@pytest.mark.parametrize("color_range", ["MPEG", "JPEG"])
@pytest.mark.parametrize("size", [(48, 64), (37, 53)])
def test_yuv_to_rgb_matches_swscale(colorspace, matrix, color_range, size):
    rgb = _textured_rgb(*size)
    src = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    yuv = src.reformat(format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range)
    y, cb, cr = _planes(yuv)
    assert cb.shape == ((size[0] + 1) // 2, (size[1] + 1) // 2)
    ours = yuv_to_rgb(y, cb, cr, matrix=matrix, full_range=color_range == "JPEG").int()
    assert ours.shape == (*size, 3) and ours.dtype == torch.int32
    # swscale with accurate rounding: the same matrix and range, so no colour bias at all
    accurate = torch.from_numpy(yuv.reformat(
        format="rgb24", src_colorspace=colorspace, src_color_range=color_range,
        interpolation=Interpolation.POINT | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT,
    ).to_ndarray()).int()
    diff = (ours - accurate).float()
    assert diff.mean(dim=(0, 1)).abs().max() < 0.35, diff.mean(dim=(0, 1))
    # a wrong matrix or range is far off on these saturated colours
    other = yuv_to_rgb(y, cb, cr, matrix="bt709" if matrix == "bt601" else "bt601",
                       full_range=color_range == "JPEG").int()
    assert (other - accurate).abs().float().mean() > 2 * (ours - accurate).abs().float().mean() + 0.5
    # and the original picture comes back up to 4:2:0 chroma loss
    assert (ours - torch.from_numpy(rgb).int()).abs().float().mean() < 6


def test_default_conversion_matches_pyav_cpu_output_within_two_levels():
    """What the CPU reader returns (PyAV's default fast swscale path, BT.601 limited) vs ours on the same planes."""
    rgb = _textured_rgb(64, 96, seed=3)
    yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    cpu = torch.from_numpy(yuv.to_ndarray(format="rgb24")).int()
    y, cb, cr = _planes(yuv)
    ours = yuv_to_rgb(y, cb, cr, matrix=matrix_for_colorspace(yuv.colorspace),
                      full_range=int(yuv.color_range) == 2).int()
    d = (ours - cpu).abs()
    assert d.float().mean() < 2.0 and d.max() <= 4, (d.float().mean(), d.max())


def test_nv12_equals_planar_on_the_same_samples():
    rgb = _textured_rgb(38, 50, seed=1)
    src = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    y, cb, cr = _planes(src.reformat(format="yuv420p"))
    interleaved = torch.stack([cb, cr], dim=-1).reshape(19, 50)  # Cb0 Cr0 Cb1 Cr1 ...
    assert torch.equal(nv12_to_rgb(y, interleaved), yuv_to_rgb(y, cb, cr))
    # swscale's own NV12 (its chroma is filtered separately, so compare the pictures, not the samples)
    y2, uv = _planes(src.reformat(format="nv12"))
    assert uv.shape == (19, 50)
    assert (nv12_to_rgb(y2, uv).int() - yuv_to_rgb(y, cb, cr).int()).abs().float().mean() < 1.0


def test_matrix_codes_and_bad_input():
    assert matrix_for_colorspace(1) == "bt709"
    assert matrix_for_colorspace(2) == "bt601"  # unspecified: swscale's default
    assert matrix_for_colorspace(None) == "bt601"
    assert matrix_for_colorspace(9) == "bt2020"
    y = torch.zeros(4, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="matrix"):
        yuv_to_rgb(y, y[:2, :3], y[:2, :3], matrix="srgb")
    with pytest.raises(ValueError, match="interleaved"):
        nv12_to_rgb(y, torch.zeros(2, 5, dtype=torch.uint8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    path = write_video(tmp_path / "v.mp4", frame_index_video(4, 32, 32))
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        open_video(path, backend="pyav", device="cuda")
    with pytest.raises(BackendUnavailableError, match="NVDEC"):
        resolve_backend("auto", device="cuda")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("decord", device="cuda")


@pytest.mark.skipif(not nvdec_available(), reason="needs a CUDA GPU and PyAV's FFmpeg with the CUDA hwaccel")
def test_nvdec_frames_match_the_cpu_reader(tmp_path):
    frames = frame_index_video(40, 96, 128)
    path = write_video(tmp_path / "idx.mp4", frames, gop=10)
    want = [0, 3, 17, 18, 39, 5, 5]
    with open_video(path, backend="pyav") as cpu, open_video(path, backend="pyav", device="cuda") as gpu:
        assert gpu.device.type == "cuda" and gpu.num_frames == cpu.num_frames == 40
        a, b = cpu.get_frames(want), gpu.get_frames(want)
        assert b.device.type == "cuda" and b.shape == a.shape == (len(want), 3, 96, 128) and b.dtype == torch.uint8
        assert [decode_frame_index(f) for f in b.permute(0, 2, 3, 1).cpu().numpy()] == want
        assert (a.int() - b.cpu().int()).abs().float().mean() < 2.0


# ----------------------------------------------------------------------------------------------- every CUDA backend

#: Stated tolerance of every NVDEC backend against the CPU reader (PyAV/swscale): mean |difference| in 8-bit levels.
#: Index-coded frames (black/white blocks) must decode to the same index; saturated colours may differ by the
#: backend's own YUV->RGB rounding and chroma upsampling.
GPU_TOLERANCE = {"index": 2.0, "colour": 4.0}


def _cuda_backend_or_skip(backend: str) -> None:
    from vidssl.io.video import check_backend

    try:
        check_backend(backend, "cuda")
    except BackendUnavailableError as e:
        pytest.skip(str(e))


def _colour_video(n: int, h: int, w: int) -> np.ndarray:
    return np.stack([np.roll(_textured_rgb(h, w, seed=s % 3), 3 * s, axis=1) for s in range(n)])


@pytest.mark.parametrize("backend", ["pyav", "torchcodec", "pynvvideocodec"])
@pytest.mark.parametrize("seek_mode", ["exact", "approximate"])
def test_every_cuda_backend_matches_the_cpu_reader(tmp_path, backend, seek_mode):
    _cuda_backend_or_skip(backend)
    idx_path = write_video(tmp_path / "idx.mp4", frame_index_video(40, 96, 128), gop=10)
    col_path = write_video(tmp_path / "col.mp4", _colour_video(20, 96, 128), gop=8)
    want = [0, 3, 17, 18, 39, 5, 5]
    with open_video(idx_path, backend="pyav") as cpu, \
            open_video(idx_path, backend=backend, device="cuda", seek_mode=seek_mode) as gpu:
        assert gpu.device.type == "cuda" and gpu.num_frames == cpu.num_frames == 40
        a, b = cpu.get_frames(want), gpu.get_frames(want)
        assert b.device.type == "cuda" and b.shape == a.shape == (len(want), 3, 96, 128) and b.dtype == torch.uint8
        assert [decode_frame_index(f) for f in b.permute(0, 2, 3, 1).cpu().numpy()] == want
        assert (a.int() - b.cpu().int()).abs().float().mean() < GPU_TOLERANCE["index"]
    with open_video(col_path, backend="pyav") as cpu, open_video(col_path, backend=backend, device="cuda") as gpu:
        a, b = cpu.get_frames([0, 7, 19, 8]), gpu.get_frames([0, 7, 19, 8])
        d = (a.int() - b.cpu().int()).abs().float().mean().item()
        print(f"{backend}: mean |GPU - CPU| on saturated colours {d:.2f} levels")
        assert d < GPU_TOLERANCE["colour"], d


def test_pynvvideocodec_reconfigure_reads_the_new_file(tmp_path):
    _cuda_backend_or_skip("pynvvideocodec")
    a = write_video(tmp_path / "a.mp4", frame_index_video(30, 64, 96), gop=10)
    b = write_video(tmp_path / "b.mp4", frame_index_video(45, 64, 96)[::-1].copy(), gop=10)  # frame i spells 44-i
    with open_video(a, backend="pynvvideocodec", device="cuda") as r:
        assert [decode_frame_index(f) for f in r.get_frames([2, 29]).permute(0, 2, 3, 1).cpu().numpy()] == [2, 29]
        r.reconfigure(b)
        assert r.num_frames == 45 and r.path == str(b)
        got = r.get_frames([0, 44, 10]).permute(0, 2, 3, 1).cpu().numpy()
        assert [decode_frame_index(f) for f in got] == [44, 0, 34]


@pytest.mark.parametrize("backend", ["pyav", "torchcodec", "pynvvideocodec"])
def test_gpu_pipeline_matches_its_cpu_twin(tmp_path, backend):
    """The pipeline on CUDA (sessions with their own streams, events, batched augmentation) gives the CPU twin's
    batches: the same items and frame indices, pixels within the backend's colour tolerance."""
    _cuda_backend_or_skip(backend)
    from vidssl.data.config import DataConfig
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.gpu_pipeline import ClipPipeline
    from vidssl.data.manifest import VideoEntry
    from vidssl.data.transforms import BatchClipAugment

    entries = []
    for v, n in enumerate((30, 41, 25)):
        p = write_video(tmp_path / f"v{v}.mp4", frame_index_video(n, 64, 96), gop=10)
        entries.append(VideoEntry(name=f"v{v}", path=str(p), kind="video", num_frames=n))
    aug = BatchClipAugment.from_config(DataConfig(source="video", root="x", crop_size=32, flip=0.5, color_jitter=0.3))
    batches = [[0, 4, 1, 7], [2, 8, 5, 3]]
    out = {}
    for dev, b in (("cpu", "pyav"), ("cuda", backend)):
        ds = ClipDataset(entries, clip_len=4, stride=2, clips_per_video=3, seed=3, backend=b, device=dev)
        out[dev] = list(ClipPipeline(ds, aug, device=dev, sessions=3, cache_size=2, prefetch=2).iterate(batches))
    for c, g in zip(out["cpu"], out["cuda"]):
        assert g["video"].device.type == "cuda"
        assert torch.equal(c["frames"], g["frames"]) and torch.equal(c["index"], g["index"])
        # 4 levels of colour tolerance, through crop and normalisation (std ~0.225): ~0.07
        assert (c["video"] - g["video"].cpu()).abs().mean() < 0.07
