"""sRGB -> CIE Lab (vidssl.models.lab, the one conversion used by MAST, CorrFlow and the Lab baselines): OpenCV's
float ``cvtColor``, closed-form greys, tabulated primaries, scikit-image, the inverse and MAST's normalisation."""

import numpy as np
import pytest
import torch

from vidssl.models.lab import D65_WHITE, denormalise_lab, lab_to_rgb, normalise_lab, rgb_to_lab


def _srgb_linear(v: float) -> float:
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def test_lab_matches_opencv_float_path():
    """Tolerance (stated): per pixel |dL| <= 0.3 and |da|, |db| <= 0.75, mean |d| <= 0.1 per channel.

    OpenCV evaluates ``COLOR_RGB2Lab`` on float32 with lookup tables (spline-interpolated gamma, a/b rounded to about
    1/64); this module computes the same formula with the same constants exactly. Measured on 3M random pixels:
    max |dL| 0.24, max |da| 0.63, max |db| 0.50, mean 0.075-0.078 per channel.
    """
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(3, 128, 128, generator=g)
    v = torch.arange(0, 256, 5) / 255.0  # a coarse 8-bit RGB cube: black, white, greys, saturated primaries
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, len(v), -1)
    for x in (rand, cube):
        ours = rgb_to_lab(x).permute(1, 2, 0).numpy()
        ref = cv2.cvtColor(np.ascontiguousarray(x.permute(1, 2, 0).numpy(), dtype=np.float32), cv2.COLOR_RGB2Lab)
        diff = np.abs(ours - ref).reshape(-1, 3)
        assert (diff.max(0) <= [0.3, 0.75, 0.75]).all(), diff.max(0)
        assert (diff.mean(0) <= 0.1).all(), diff.mean(0)
    assert D65_WHITE == (0.950456, 1.0, 1.088754)  # OpenCV's white (not the CIE 0.95047 / 1.08883)


def test_lab_white_black_and_greys_closed_form():
    white = rgb_to_lab(torch.ones(3, 1, 1, dtype=torch.float64)).flatten()
    torch.testing.assert_close(white, torch.tensor([100.0, 0.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    assert rgb_to_lab(torch.zeros(3, 1, 1)).abs().max() < 1e-4
    for v in (0.02, 0.2, 0.5, 0.8):
        # Grey: Y = linear(v) (the Y row of the sRGB matrix sums to 1), a = b = 0.
        y = _srgb_linear(v)
        f = y ** (1 / 3) if y > (6 / 29) ** 3 else y / (3 * (6 / 29) ** 2) + 4 / 29
        lab = rgb_to_lab(torch.full((3, 1, 1), v, dtype=torch.float64)).flatten()
        assert lab[0].item() == pytest.approx(116 * f - 16, abs=1e-4)
        assert abs(lab[1].item()) < 1e-3 and abs(lab[2].item()) < 1e-3


def test_lab_matches_scikit_image():
    skc = pytest.importorskip("skimage.color")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 20, 30, generator=g, dtype=torch.float64)
    ref = torch.from_numpy(skc.rgb2lab(x.permute(1, 2, 0).numpy())).permute(2, 0, 1)
    # same formula; the D65 white differs in the 5th digit (OpenCV 0.950456/1.088754 vs 0.95047/1.08883)
    torch.testing.assert_close(rgb_to_lab(x), ref, atol=0.02, rtol=0)


def test_lab_reference_values_and_round_trip():
    # sRGB primaries in CIE Lab (D65), as tabulated by standard colour calculators (e.g. Lindbloom)
    prim = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    lab = rgb_to_lab(prim.T[:, :, None])[..., 0].T
    expected = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [100.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(lab, expected, atol=0.01, rtol=0)
    grey = rgb_to_lab(torch.full((3, 2, 2), 0.5, dtype=torch.float64))
    torch.testing.assert_close(grey[1:], torch.zeros(2, 2, 2, dtype=torch.float64), atol=1e-9, rtol=0)
    x = torch.rand(2, 4, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-9, rtol=0)
    n = normalise_lab(rgb_to_lab(x))
    assert n[..., 0, :, :].abs().max() <= 1.0 + 1e-9 and n[..., 1:, :, :].abs().max() < 1.0
    torch.testing.assert_close(denormalise_lab(n), rgb_to_lab(x))
    with pytest.raises(ValueError, match="rgb"):
        rgb_to_lab(torch.zeros(4, 5, 6))
