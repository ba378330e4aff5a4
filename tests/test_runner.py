"""The DAVIS propagation runner on a tiny synthetic DAVIS tree (and on the real sample when present)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vidssl.data.davis import DavisLayoutError
from vidssl.evaluation.features import LabFeatures, build_encoder_features
from vidssl.evaluation.presets import get_preset, preset_config
from vidssl.evaluation.runner import (
    ResultsExistError,
    downsample_labels,
    labels_to_ids,
    propagate_davis,
)
from vidssl.io.images import DAVIS_PALETTE

from davis_scores import rescored_j_mean  # tests/davis_scores.py

H, W, SIDE = 48, 72, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _square_positions(t: int) -> list[tuple[int, int]]:
    """Top-left corners of object 1 and 2 at frame t (even coordinates, 2 px steps)."""
    return [(4 + 2 * t, 6 + 2 * t), (30 - 2 * t, 50 - 2 * t)]


def _scene(t: int, objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``(H, W, 3) uint8`` and ids ``(H, W)``: colour-coded static background, textured moving squares.

    Colours code scene coordinates (R, G) and the layer (B), so a 'perfect' extractor can decode them.
    """
    ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    img = np.stack([4 * xs % 256, 4 * ys % 256, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    ids = np.zeros((H, W), dtype=np.uint8)
    for k, (y0, x0) in enumerate(_square_positions(t)[:objects], start=1):
        v, u = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
        img[y0:y0 + SIDE, x0:x0 + SIDE] = np.stack([20 + 16 * u, 20 + 16 * v, np.full_like(u, 120 * k)], -1)
        ids[y0:y0 + SIDE, x0:x0 + SIDE] = k
    return img, ids


def make_davis(root: Path, *, seqs: dict[str, int], objects: int = 2, year: str = "2017",
               split: str = "val") -> Path:
    """A DAVIS tree: PNG frames (lossless), mode-P (2017) or mode-L 0/255 (2016) annotations, a sequence list."""
    for name, n in seqs.items():
        fdir = root / "JPEGImages" / "480p" / name
        adir = root / "Annotations" / "480p" / name
        fdir.mkdir(parents=True)
        adir.mkdir(parents=True)
        for t in range(n):
            img, ids = _scene(t, objects)
            Image.fromarray(img).save(fdir / f"{t:05d}.png")
            if year == "2017":
                im = Image.fromarray(ids, mode="P")
                im.putpalette(list(DAVIS_PALETTE))
            else:
                im = Image.fromarray(((ids > 0) * 255).astype(np.uint8), mode="L")
            im.save(adir / f"{t:05d}.png")
    sets = root / "ImageSets" / year
    sets.mkdir(parents=True)
    (sets / f"{split}.txt").write_text("\n".join(seqs) + "\n")
    return root


class PerfectFeatures:
    """Decodes the colour code of :func:`_scene` into position/layer codes, at stride 2 (squares align to cells)."""

    name = "perfect"
    stride = 2

    def __init__(self):
        self.calls = 0

    def input_size(self, height, width):
        return height, width

    def feature_size(self, height, width):
        return math.ceil(height / 2), math.ceil(width / 2)

    def __call__(self, frames):
        self.calls += frames.shape[0]
        x = frames.float() / 255
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        codes = []
        for f in (1.0, 3.0):
            codes += [torch.sin(f * 2 * r), torch.cos(f * 2 * r), torch.sin(f * 2 * g), torch.cos(f * 2 * g)]
        layers = [(b < 0.25).float() * 4, ((b > 0.25) & (b < 0.75)).float() * 4, (b > 0.75).float() * 4]
        feats = torch.stack(codes + layers, dim=1)
        return F.adaptive_avg_pool2d(feats, self.feature_size(frames.shape[-2], frames.shape[-1]))


def _small_crw(**changes):
    cfg = dataclasses.replace(get_preset("crw"), context=4, chunk_size=256, tile=6)
    return dataclasses.replace(cfg, **changes)


def _check_layout(root: Path, out: Path, seqs: dict[str, int], *, year: str = "2017"):
    for name, n in seqs.items():
        files = sorted((out / name).glob("*.png"))
        assert [f.name for f in files] == [f"{t:05d}.png" for t in range(n)]
        gt0 = Image.open(root / "Annotations" / "480p" / name / "00000.png")
        for f in files:
            with Image.open(f) as im:
                assert im.mode == "P" and im.size == (W, H)
                ids = np.array(im)
                assert ids.max() <= (1 if year == "2016" else 2)
                if year == "2017":
                    assert im.getpalette()[:9] == list(DAVIS_PALETTE)[:9]
        first = np.array(Image.open(files[0]))
        expected = np.array(gt0) if year == "2017" else (np.array(gt0) > 127).astype(np.uint8)
        assert np.array_equal(first, expected)  # frame 0 is the GT copy (2016: ids 0/1)


SEQS = {"sq-a": 7, "sq-b": 5}


@pytest.fixture
def davis(tmp_path):
    return make_davis(tmp_path / "davis", seqs=SEQS)


def test_perfect_features_score_high_and_write_metrics(davis, tmp_path):
    out = tmp_path / "res"
    ext = PerfectFeatures()
    logs = []
    m = propagate_davis(davis_root=davis, out_dir=out, extractor=ext, preset=_small_crw(), progress=False,
                        log=logs.append, extra_info={"command": "test"})
    _check_layout(davis, out, SEQS)
    assert ext.calls == sum(SEQS.values())  # features computed once per frame
    assert m["per_sequence"]["sq-a"]["features_computed"] == 7
    assert m["global"]["J&F-Mean"] >= 0.95, m["global"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["global"] == m["global"]
    assert saved["hyperparameters"]["context"] == 4 and saved["hyperparameters"]["topk"] == 10
    assert set(saved["per_object"]) == {"sq-a_1", "sq-a_2", "sq-b_1", "sq-b_2"}
    assert saved["versions"]["torch"] == torch.__version__ and saved["versions"]["numpy"] == np.__version__
    assert saved["extra_info"] == {"command": "test"}
    assert saved["per_sequence"]["sq-b"]["peak_memory_bytes"] > 0
    with open(out / "global_results-val.csv") as f:  # the official CSV holds the same numbers (%.3f)
        row = next(csv.DictReader(f))
    assert float(row["J&F-Mean"]) == pytest.approx(m["global"]["J&F-Mean"], abs=6e-4)
    with open(out / "per-sequence_results-val.csv") as f:
        per_seq = {r["Sequence"]: float(r["J-Mean"]) for r in csv.DictReader(f)}
    assert per_seq.keys() == saved["per_object"].keys()
    header = "\n".join(logs)
    assert "topk = 10" in header and "temperature = 0.05" in header and "J&F-Mean" in header
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".res")]  # no temporary folder left


def test_identity_and_lab_are_well_formed(davis, tmp_path):
    m = propagate_davis(davis_root=davis, out_dir=tmp_path / "id", extractor="identity", preset=get_preset("crw"),
                        progress=False, log=None)
    _check_layout(davis, tmp_path / "id", SEQS)
    first = np.array(Image.open(tmp_path / "id" / "sq-a" / "00000.png"))
    assert np.array_equal(np.array(Image.open(tmp_path / "id" / "sq-a" / "00004.png")), first)
    g = m["global"]
    assert g["J-Mean"] == pytest.approx(rescored_j_mean(davis, tmp_path / "id", list(SEQS)), abs=1e-6)
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2, abs=1e-6) and g["J-Mean"] < 0.9
    m = propagate_davis(davis_root=davis, out_dir=tmp_path / "lab", extractor=LabFeatures(stride=4),
                        preset=_small_crw(), progress=False, log=None, evaluate=False)
    _check_layout(davis, tmp_path / "lab", SEQS)
    assert m["global"] is None and not (tmp_path / "lab" / "global_results-val.csv").exists()


def test_dino_preset_resized_path(davis, tmp_path):
    cfg = preset_config("dino", ["propagate.short_side=24", "propagate.size_multiple=16", "propagate.context=3"])
    ext = LabFeatures.from_config(cfg, stride=2)
    assert ext.input_size(H, W) == (24, 32)
    m = propagate_davis(davis_root=davis, out_dir=tmp_path / "dino", extractor=ext, preset=cfg, progress=False,
                        log=None, evaluate=False, sequences=["sq-b"])
    _check_layout(davis, tmp_path / "dino", {"sq-b": 5})
    assert m["per_sequence"]["sq-b"]["feature_size"] == [12, 16]
    assert m["hyperparameters"]["upsample_to"] == "resized" and m["hyperparameters"]["norm_mask"] is True


def test_year_2016_results_use_ids_0_1(tmp_path):
    root = make_davis(tmp_path / "d16", seqs={"one": 5}, objects=1, year="2016", split="sample")
    out = tmp_path / "r16"
    m = propagate_davis(davis_root=root, out_dir=out, extractor=PerfectFeatures(), preset=_small_crw(),
                        year="2016", split="sample", progress=False, log=None)
    _check_layout(root, out, {"one": 5}, year="2016")
    assert m["global"]["J&F-Mean"] >= 0.95


def test_viz_writes_overlays_and_mp4(davis, tmp_path):
    import av

    out = tmp_path / "viz"
    propagate_davis(davis_root=davis, out_dir=out, extractor="identity", preset=get_preset("crw"), viz=True,
                    sequences=["sq-b"], progress=False, log=None, evaluate=False)
    jpgs = sorted((out / "viz" / "sq-b").glob("*.jpg"))
    assert [p.stem for p in jpgs] == [f"{t:05d}" for t in range(5)]
    with Image.open(jpgs[0]) as im:
        assert im.size == (W, H)
        pixel = np.array(im.convert("RGB"))[4 + SIDE // 2, 6 + SIDE // 2]
    assert pixel[0] > pixel[2]  # object 1 tinted with its palette colour (128, 0, 0)
    with av.open(str(out / "viz" / "sq-b.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[0] % 2 == 0 and frames[0].shape[1] % 2 == 0


def test_refuses_existing_results_and_force_replaces(davis, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ResultsExistError, match="res"):
        propagate_davis(davis_root=davis, out_dir=out, extractor="identity", preset=get_preset("crw"),
                        progress=False, log=None)
    assert (out / "keep.txt").read_text() == "old"
    propagate_davis(davis_root=davis, out_dir=out, extractor="identity", preset=get_preset("crw"), force=True,
                    progress=False, log=None, evaluate=False)
    assert not (out / "keep.txt").exists() and (out / "sq-a" / "00000.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["davis", "res"]


class _Exploding(PerfectFeatures):
    def __call__(self, frames):
        if self.calls >= 8:
            raise RuntimeError("boom in the middle of the run")
        return super().__call__(frames)


def test_force_keeps_old_results_until_new_ones_are_complete(davis, tmp_path):
    out = tmp_path / "res"
    propagate_davis(davis_root=davis, out_dir=out, extractor="identity", preset=get_preset("crw"), progress=False,
                    log=None, evaluate=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="boom"):
        propagate_davis(davis_root=davis, out_dir=out, extractor=_Exploding(), preset=_small_crw(feature_batch=1),
                        force=True, progress=False, log=None)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["davis", "res"]


def _break_count(root):
    (root / "Annotations" / "480p" / "sq-b" / "00004.png").unlink()
    return "sq-b"


def _break_size(root):
    Image.new("P", (W + 2, H)).save(root / "Annotations" / "480p" / "sq-b" / "00000.png")
    return "00000.png"


def _break_2016_masks_in_2017(root):
    for p in (root / "Annotations" / "480p" / "sq-b").glob("*.png"):
        Image.fromarray(((np.array(Image.open(p)) > 0) * 255).astype(np.uint8), mode="L").save(p)
    return "2016"


def _break_extra_ids(root):
    p = root / "Annotations" / "480p" / "sq-b" / "00003.png"
    ids = np.array(Image.open(p))
    ids[0:3, 0:3] = 3
    im = Image.fromarray(ids, mode="P")
    im.putpalette(list(DAVIS_PALETTE))
    im.save(p)
    return "00003.png"


def _break_imagesets(root):
    (root / "ImageSets" / "2017" / "val.txt").unlink()
    return "val.txt"


@pytest.mark.parametrize("breaker,exc", [
    (_break_count, DavisLayoutError),
    (_break_size, DavisLayoutError),
    (_break_2016_masks_in_2017, DavisLayoutError),
    (_break_extra_ids, DavisLayoutError),
    (_break_imagesets, FileNotFoundError),
])
def test_bad_input_gets_one_clear_error_and_nothing_is_lost(davis, tmp_path, breaker, exc):
    out = tmp_path / "res"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    needle = breaker(davis)
    with pytest.raises(exc, match=needle):
        propagate_davis(davis_root=davis, out_dir=out, extractor="identity", preset=get_preset("crw"), force=True,
                        progress=False, log=None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["davis", "res"]


def test_label_down_and_upsample_helpers():
    ids = torch.zeros(37, 51, dtype=torch.long)
    ids[5:20, 10:31] = 1
    ids[22:30, 40:50] = 2
    soft = downsample_labels(ids, num_classes=3, size=(5, 7), mode="bilinear")
    assert soft.shape == (3, 5, 7)
    torch.testing.assert_close(soft.sum(0), torch.ones(5, 7))
    hard = downsample_labels(ids, num_classes=3, size=(5, 7), mode="nearest")
    # nearest == PIL NEAREST on the id map
    pil = np.array(Image.fromarray(ids.numpy().astype(np.uint8)).resize((7, 5), Image.NEAREST))
    assert np.array_equal(hard.argmax(0).numpy(), pil)
    back = labels_to_ids(F.one_hot(torch.from_numpy(pil).long(), 3).permute(2, 0, 1).float(), size=(37, 51))
    assert back.shape == (37, 51) and set(back.unique().tolist()) <= {0, 1, 2}
    resized = labels_to_ids(soft, size=(37, 51), resized=(20, 28), norm_mask=True)
    assert resized.shape == (37, 51)


def test_presets_official_values_and_overrides():
    from vidssl.config import ConfigError
    from vidssl.evaluation.presets import PRESETS

    crw = get_preset("crw")
    assert (crw.context, crw.topk, crw.radius, crw.temperature) == (20, 10, 12.0, 0.05)
    assert crw.restrict_shape == "circle" and not crw.first_frame_restricted and crw.pad_prev_with_first
    assert crw.label_down == "bilinear" and crw.resize == "native" and not crw.norm_mask
    dino = get_preset("dino")
    assert (dino.context, dino.topk, dino.radius, dino.temperature) == (7, 5, 12.0, 0.1)
    assert dino.restrict_shape == "square" and dino.first_frame_restricted and not dino.pad_prev_with_first
    assert dino.std[0] == 0.228 and dino.label_down == "nearest" and dino.upsample_to == "resized"
    assert set(PRESETS) == {"crw", "dino", "mast", "corrflow"}
    mast = get_preset("mast")
    assert mast.window.radius == 12 and mast.window.memory == "long_short" and mast.feedback == "hard"
    assert get_preset("corrflow").window.crop_multiple == 8
    cfg = preset_config("crw", ["propagate.topk=5", "bf16=true", "propagate.mean=[0.5, 0.5, 0.5]"])
    assert (cfg.topk, cfg.bf16, cfg.mean, cfg.context) == (5, True, (0.5, 0.5, 0.5), 20)
    assert cfg.propagation_kwargs()["dtype"] == torch.bfloat16
    with pytest.raises(ConfigError, match="propagate.topk"):
        preset_config("crw", ["propagate.topk=many"])
    with pytest.raises(ConfigError, match="propagate.temperature"):
        preset_config("crw", ["propagate.temperature=0"])
    with pytest.raises(ConfigError, match="propagate.nope"):
        preset_config("crw", ["propagate.nope=1"])
    with pytest.raises(ConfigError, match="unknown propagation preset"):
        get_preset("timecycle")


def test_keys_of_the_other_protocol_family_are_errors_naming_the_key(tmp_path, capsys):
    from vidssl.cli import main
    from vidssl.config import ConfigError

    # window presets read only device, feature_batch and window.*: a top-k key would be silently ignored
    with pytest.raises(ConfigError, match=r"^propagate\.radius: does not apply to preset 'mast' \(window protocol\); "
                                          r"its keys are propagate\.window\.\*"):
        preset_config("mast", ["propagate.radius=6"])
    with pytest.raises(ConfigError, match=r"^propagate\.topk: does not apply to preset 'corrflow'"):
        preset_config("corrflow", ["propagate.topk=3"])
    with pytest.raises(ConfigError, match=r"^propagate\.window: does not apply to preset 'crw' \(top-k protocol\)"):
        preset_config("crw", ["propagate.window.radius=6"])
    cfg = preset_config("mast", ["propagate.window.radius=6", "propagate.device=cpu", "propagate.feature_batch=2"])
    assert (cfg.window.radius, cfg.feature_batch, cfg.radius) == (6, 2, 12.0)
    assert preset_config("dino", ["propagate.radius=6"]).radius == 6.0
    # the CLI builds the config through the same checks
    rc = main(["propagate", "--encoder", "lab", "--preset", "mast", "--davis-root", str(tmp_path / "none"),
               "--out", str(tmp_path / "out"), "--set", "propagate.radius=6"])
    assert rc == 2
    assert "propagate.radius: does not apply to preset 'mast' (window protocol)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_real_davis2016_sample_lab_and_resnet18(tmp_path, davis_sample):
    """Two real sequences (first 3 frames each, symlinked, never copied) with lab and resnet18 features at 480p."""
    real = davis_sample
    root = tmp_path / "davis"
    seqs = ["dog-agility", "rollerblade"]
    for name in seqs:
        for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
            d = root / kind / "480p" / name
            d.mkdir(parents=True)
            for t in range(3):
                (d / f"{t:05d}.{ext}").symlink_to((real / kind / "480p" / name / f"{t:05d}.{ext}").resolve())
    (root / "ImageSets" / "2016").mkdir(parents=True)
    (root / "ImageSets" / "2016" / "sample.txt").write_text("\n".join(seqs) + "\n")
    cfg = dataclasses.replace(get_preset("crw"), context=2)
    for name, ext in (("lab", LabFeatures.from_config(cfg)),
                      ("r18", build_encoder_features("resnet18", seed=0, cfg=cfg))):
        out = tmp_path / name
        m = propagate_davis(davis_root=root, out_dir=out, extractor=ext, preset=cfg, year="2016", split="sample",
                            progress=False, log=None)
        for seq in seqs:
            files = sorted((out / seq).glob("*.png"))
            assert len(files) == 3
            with Image.open(files[-1]) as im:
                assert im.mode == "P" and im.size == (854, 480)
                assert set(np.unique(np.array(im)).tolist()) <= {0, 1}
            assert m["per_sequence"][seq]["feature_size"] == [60, 107]
        g = m["global"]
        assert g["J-Mean"] == pytest.approx(rescored_j_mean(root, out, seqs, year="2016"), abs=1e-6)
        assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2, abs=1e-6)
        assert g["J-Mean"] > 0.5  # one frame after the annotated one: both features keep most of the objects
        assert set(m["per_object"]) == {"dog-agility_1", "rollerblade_1"}
        assert json.loads((out / "metrics.json").read_text())["year"] == "2016"
