"""Deterministic synthetic videos: textured objects over textured backgrounds, with exact masks.

Every video is a function of ``(cfg.seed, index)`` only (a local ``numpy.random.Generator``; no global RNG). A scene
holds a textured background and ``min_objects..max_objects`` textured shapes (star-convex polygons or ellipses) that
move on smooth trajectories (drift + wobble, reflected at the borders of the first view), change scale and rotate,
overlap in a fixed depth order, and are filmed by a panning camera under a global brightness/contrast drift.

Colour alone is ambiguous by design (``shared_palette``): the background uses every colour of the video's small
palette and each object paints its pattern (stripes, checker, rings, blobs, mosaic, dots) with a subset of the same
colours, so only the texture (spatial pattern) tells an object from the background or from another object.

Rendering is inverse mapping with nearest sampling: every output pixel is mapped back into background (world) or
object-local coordinates and the procedural texture is evaluated there, so masks and frames agree pixel for pixel.

Writers: :func:`write_davis` (DAVIS-2017 layout, cached by config), :func:`write_videos` (H.264 through
:func:`vidssl.io.write_video`, lossless ``libx264rgb`` or lossy ``yuv420p``), :func:`write_multishot` (hard cuts at
known frames) and :func:`frame_index_video` / :func:`decode_frame_index` (frames that carry their own index, for
frame-accurate decoder tests).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from vidssl.config import ConfigError, to_dict
from vidssl.io.atomic import atomic_path, atomic_write_text
from vidssl.io.images import write_label_png
from vidssl.io.writer import write_video

#: Bumped whenever the rendering changes, so a cached tree from older code is not mistaken for the current one.
GENERATOR_VERSION = 2

# RNG streams: the first entropy words after the seed, so videos, shots and shot lengths never share draws.
_STREAM_VIDEO = 0
_STREAM_SHOT = 1
_STREAM_SHOT_LENGTHS = 2

_TEXTURES = ("stripes", "checker", "rings", "blobs", "mosaic", "dots")
_BACKGROUND_TEXTURES = ("stripes", "checker", "blobs", "mosaic")
_LAYOUT_ATTEMPTS = 200


@dataclass
class SynthConfig:
    """What the generated videos look like; lengths in pixels unless said otherwise."""

    num_frames: int = 16  #: frames per video (T)
    height: int = 128  #: frame height H
    width: int = 128  #: frame width W
    min_objects: int = 1  #: fewest objects in a video
    max_objects: int = 3  #: most objects in a video
    seed: int = 0  #: base seed; video ``index`` uses entropy (seed, index)
    object_size: tuple[float, float] = (0.1, 0.2)  #: object radius range, fraction of min(H, W)
    max_speed: float = 2.2  #: max object speed, px/frame (drift plus wobble)
    scale_range: tuple[float, float] = (0.8, 1.25)  #: each object's scale goes between two draws from this range
    max_rotation: float = 12.0  #: max object rotation speed, degrees/frame
    #: non-rigid deformation: max amplitude of a travelling sinusoidal warp of each object (shape and texture),
    #: fraction of its radius; 0 = rigid objects
    deform: float = 0.3
    camera_pan: float = 1.0  #: max camera pan speed per axis, px/frame (background and objects move together)
    lighting_drift: float = 0.15  #: max brightness (fraction of 255) and contrast (fraction) change over a video
    occlusion: bool = True  #: objects may overlap (and some are aimed at each other); False keeps them apart
    num_colours: int = 4  #: colours in a video's palette (the background uses all of them)
    shared_palette: bool = True  #: objects paint with the background's colours, so colour alone is ambiguous
    texture_period: tuple[float, float] = (0.04, 0.12)  #: object texture period range, fraction of min(H, W)
    background_period: tuple[float, float] = (0.08, 0.2)  #: background texture period range, fraction of min(H, W)
    noise_std: float = 2.0  #: per-pixel Gaussian noise, 0-255 scale
    min_first_visible: float = 0.6  #: each object shows at least this fraction of its area in frame 0

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        p = f"{prefix}." if prefix else ""

        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"{p}{name}: {what}, got {getattr(self, name)!r}")

        if self.num_frames < 1:
            raise bad("num_frames", "must be >= 1")
        if self.height < 16:
            raise bad("height", "must be >= 16")
        if self.width < 16:
            raise bad("width", "must be >= 16")
        if self.min_objects < 1:
            raise bad("min_objects", "must be >= 1")
        if not self.min_objects <= self.max_objects <= 20:
            raise bad("max_objects", f"must lie in min_objects ({self.min_objects})..20")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        lo, hi = self.object_size
        if not 0 < lo <= hi:
            raise bad("object_size", "need 0 < lo <= hi")
        slo, shi = self.scale_range
        if not 0 < slo <= shi:
            raise bad("scale_range", "need 0 < lo <= hi")
        if hi * shi >= 0.5:
            raise bad("object_size", f"largest radius times largest scale ({shi}) must stay below 0.5 (half the "
                                     "short side) so every object fits in the first frame")
        if self.max_speed < 0:
            raise bad("max_speed", "must be >= 0")
        if self.max_rotation < 0:
            raise bad("max_rotation", "must be >= 0")
        if not 0 <= self.deform <= 0.5:
            raise bad("deform", "must lie in [0, 0.5]")
        if self.camera_pan < 0:
            raise bad("camera_pan", "must be >= 0")
        if not 0 <= self.lighting_drift < 1:
            raise bad("lighting_drift", "must lie in [0, 1)")
        if not 2 <= self.num_colours <= 16:
            raise bad("num_colours", "must lie in 2..16")
        for name in ("texture_period", "background_period"):
            plo, phi = getattr(self, name)
            if not 0 < plo <= phi:
                raise bad(name, "need 0 < lo <= hi")
        if self.noise_std < 0:
            raise bad("noise_std", "must be >= 0")
        if not 0 < self.min_first_visible <= 1:
            raise bad("min_first_visible", "must lie in (0, 1]")


@dataclass
class SynthVideo:
    """One generated video and its ground truth.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB.
        masks: ``(T, H, W)`` uint8; 0 background, ``1..N`` objects; an occluded pixel belongs to the occluder.
        name: video name.
        centers: ``(T, N, 2)`` float32 image-space ``(x, y)`` of each object's centre (may lie outside the frame).
        areas: ``(T, N)`` int64 pixels each object would cover in the frame if nothing occluded it (amodal area,
            clipped to the frame); ``(masks == k).sum()`` is less than ``areas[:, k - 1]`` where it is occluded.
        depth_order: object ids from back to front.
        camera: ``(T, 2)`` float32 camera offset ``(x, y)`` in pixels (image = world shifted by ``-camera``).
    """

    frames: np.ndarray
    masks: np.ndarray
    name: str
    centers: np.ndarray
    areas: np.ndarray
    depth_order: list[int]
    camera: np.ndarray

    @property
    def num_objects(self) -> int:
        return int(self.areas.shape[1])

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class MultiShotVideo:
    """Shots of different scenes joined by hard cuts.

    Attributes:
        frames: ``(T, H, W, 3)`` uint8 RGB, all shots concatenated.
        masks: one ``(T_i, H, W)`` uint8 mask array per shot (ids restart at 1 in every shot: other scenes, other
            objects).
        cuts: frame indices where each new shot starts (``num_shots - 1`` of them; 0 is not a cut).
        name: video name.
    """

    frames: np.ndarray
    masks: list[np.ndarray]
    cuts: list[int]
    name: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# scene description (private)


@dataclass
class _Texture:
    kind: str
    colours: np.ndarray  # (n, 3) float32
    period: float
    angle: float
    phase: float
    grid: np.ndarray | None = None  # blobs: (g, g) values in [0, 1); mosaic: (g, g, 2) jitter in [0, 1)
    cell_colour: np.ndarray | None = None  # mosaic: (g, g) colour index


@dataclass
class _Object:
    id: int
    shape: str  # "polygon" or "ellipse"
    params: np.ndarray  # polygon: (K, 2) vertices (CCW, star-convex about 0); ellipse: (a, b)
    radius: float  # max distance of the shape from its centre at scale 1
    texture: _Texture
    p0: np.ndarray = field(default_factory=lambda: np.zeros(2))  # world centre at t = 0
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))
    wobble: np.ndarray = field(default_factory=lambda: np.zeros(2))  # amplitude per axis
    wobble_freq: float = 0.0
    wobble_phase: np.ndarray = field(default_factory=lambda: np.zeros(2))
    theta0: float = 0.0
    omega: float = 0.0  # radians / frame
    scale0: float = 1.0
    scale1: float = 1.0
    deform_amp: float = 0.0  # warp amplitude, fraction of radius
    deform_freq: float = 0.0  # radians / frame
    deform_phase: np.ndarray = field(default_factory=lambda: np.zeros(2))


@dataclass
class _Scene:
    background: _Texture
    objects: list[_Object]  # in depth order, back to front
    camera: np.ndarray  # (T, 2)
    contrast: np.ndarray  # (T,)
    brightness: np.ndarray  # (T,) in 0-255 units
    height: int
    width: int


def _ease(num_frames: int) -> np.ndarray:
    """Smooth ramp 0 -> 1 over the video, ``(T,)`` float64 (all zeros for a single frame)."""
    if num_frames == 1:
        return np.zeros(1)
    t = np.arange(num_frames) / (num_frames - 1)
    return t * t * (3 - 2 * t)


def _reflect(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fold ``x`` into ``[lo, hi]`` like a ball bouncing off the walls (triangle wave; continuous)."""
    span = np.maximum(hi - lo, 1e-6)
    y = np.mod(x - lo, 2 * span)
    return lo + span - np.abs(span - y)


def _draw_palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours (float32 ``(n, 3)``), at least 80 apart in RGB where possible (the bar drops if not)."""
    colours: list[np.ndarray] = []
    min_dist = 80.0
    while len(colours) < n:
        for _ in range(50):
            c = rng.uniform(20, 235, size=3)
            if all(np.linalg.norm(c - d) >= min_dist for d in colours):
                colours.append(c)
                break
        else:
            min_dist *= 0.8
    return np.asarray(colours, dtype=np.float32)


def _draw_texture(rng: np.random.Generator, kind: str, colours: np.ndarray, period: float) -> _Texture:
    tex = _Texture(kind=kind, colours=colours, period=period, angle=float(rng.uniform(0, math.pi)),
                   phase=float(rng.uniform(0, 1)))
    g = 16
    if kind == "blobs":
        # ranks make the grid values uniform, so every colour covers a similar share
        values = rng.permutation(g * g).reshape(g, g).astype(np.float32) / (g * g)
        tex.grid = values
    elif kind == "mosaic":
        tex.grid = rng.uniform(0.1, 0.9, size=(g, g, 2)).astype(np.float32)
        tex.cell_colour = rng.integers(0, len(colours), size=(g, g))
    return tex


def _texture_index(tex: _Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Colour index (int, same shape as ``u``) of texture ``tex`` at texture coordinates ``(u, v)`` in pixels."""
    n = len(tex.colours)
    p = tex.period
    ca, sa = math.cos(tex.angle), math.sin(tex.angle)
    ur = ca * u + sa * v
    vr = -sa * u + ca * v
    if tex.kind == "stripes":
        return np.floor(ur / p + tex.phase).astype(np.int64) % n
    if tex.kind == "checker":
        return (np.floor(ur / p + tex.phase) + np.floor(vr / p)).astype(np.int64) % n
    if tex.kind == "rings":
        return np.floor(np.hypot(u, v) / p + tex.phase).astype(np.int64) % n
    if tex.kind == "dots":
        fu = ur / p + tex.phase - np.floor(ur / p + tex.phase) - 0.5
        fv = vr / p - np.floor(vr / p) - 0.5
        inside = fu * fu + fv * fv < 0.09
        cell = (np.floor(ur / p + tex.phase) + np.floor(vr / p)).astype(np.int64)
        # dot colour alternates over the colours after the first; the ground is colour 0
        return np.where(inside, 1 + cell % max(n - 1, 1), 0) % n
    assert tex.grid is not None
    g = tex.grid.shape[0]
    x = ur / p + tex.phase * g
    y = vr / p
    if tex.kind == "blobs":
        x0 = np.floor(x)
        y0 = np.floor(y)
        fx = (x - x0).astype(np.float32)
        fy = (y - y0).astype(np.float32)
        i0 = x0.astype(np.int64) % g
        j0 = y0.astype(np.int64) % g
        i1 = (i0 + 1) % g
        j1 = (j0 + 1) % g
        grid = tex.grid
        val = ((grid[j0, i0] * (1 - fx) + grid[j0, i1] * fx) * (1 - fy)
               + (grid[j1, i0] * (1 - fx) + grid[j1, i1] * fx) * fy)
        # bilinear mixing pulls values to the middle: stretch [0.2, 0.8] over the n colours
        return np.clip(np.floor((val - 0.2) / 0.6 * n), 0, n - 1).astype(np.int64)
    if tex.kind == "mosaic":
        assert tex.cell_colour is not None
        cx = np.floor(x).astype(np.int64)
        cy = np.floor(y).astype(np.int64)
        best = np.full(x.shape, np.inf, dtype=np.float32)
        out = np.zeros(x.shape, dtype=np.int64)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                i = (cx + dx) % g
                j = (cy + dy) % g
                site = tex.grid[j, i]
                d = (x - (cx + dx + site[..., 0])) ** 2 + (y - (cy + dy + site[..., 1])) ** 2
                closer = d < best
                best = np.where(closer, d, best)
                out = np.where(closer, tex.cell_colour[j, i], out)
        return out
    raise ValueError(f"unknown texture kind {tex.kind!r}")


def _draw_shape(rng: np.random.Generator, radius: float) -> tuple[str, np.ndarray, float]:
    if rng.uniform() < 0.35:
        a = radius
        b = radius * rng.uniform(0.5, 1.0)
        return "ellipse", np.array([a, b]), float(radius)
    k = int(rng.integers(3, 9))
    # jittered, evenly spaced angles: consecutive gaps stay below pi, so the polygon is star-convex about 0
    angles = 2 * math.pi * (np.arange(k) + rng.uniform(-0.2, 0.2, size=k)) / k + rng.uniform(0, 2 * math.pi)
    angles = np.sort(np.mod(angles, 2 * math.pi))
    radii = radius * rng.uniform(0.65, 1.0, size=k)
    radii[int(rng.integers(k))] = radius
    verts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return "polygon", verts, float(radius)


def _inside(obj: _Object, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean ``(same shape as u)``: object-local points ``(u, v)`` (scale 1) inside the object's shape."""
    if obj.shape == "ellipse":
        a, b = obj.params
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    verts = obj.params
    k = len(verts)
    angles = np.mod(np.arctan2(verts[:, 1], verts[:, 0]), 2 * math.pi)
    phi = np.mod(np.arctan2(v, u), 2 * math.pi)
    sector = (np.searchsorted(angles, phi, side="right") - 1) % k
    ax, ay = verts[sector, 0], verts[sector, 1]
    nxt = (sector + 1) % k
    bx, by = verts[nxt, 0], verts[nxt, 1]
    return (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0


def _pose(obj: _Object, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World centres ``(T, 2)``, rotation angles ``(T,)`` and scales ``(T,)`` of one object."""
    t = np.arange(num_frames, dtype=np.float64)
    raw = (obj.p0[None] + obj.velocity[None] * t[:, None]
           + obj.wobble[None] * (np.sin(obj.wobble_freq * t[:, None] + obj.wobble_phase[None])
                                 - np.sin(obj.wobble_phase[None])))
    r = obj.radius * max(obj.scale0, obj.scale1)
    lo = np.array([r, r])
    hi = np.array([width - 1 - r, height - 1 - r])
    centres = _reflect(raw, lo, hi)
    theta = obj.theta0 + obj.omega * t
    scale = np.exp(np.log(obj.scale0) + (np.log(obj.scale1) - np.log(obj.scale0)) * _ease(num_frames))
    return centres, theta, scale


def _draw_motion(rng: np.random.Generator, cfg: SynthConfig, objects: list[_Object]) -> None:
    """Draw start positions and motions of ``objects`` (in place)."""
    h, w, T = cfg.height, cfg.width, cfg.num_frames
    for obj in objects:
        obj.scale0, obj.scale1 = (float(s) for s in rng.uniform(*cfg.scale_range, size=2))
        r0 = obj.radius * max(obj.scale0, obj.scale1)  # the reflection box of _pose
        obj.p0 = np.array([rng.uniform(r0, w - 1 - r0), rng.uniform(r0, h - 1 - r0)])
        drift = cfg.max_speed * rng.uniform(0.3, 0.8)
        direction = rng.uniform(0, 2 * math.pi)
        obj.velocity = drift * np.array([math.cos(direction), math.sin(direction)])
        obj.wobble_freq = 2 * math.pi / rng.uniform(8, 24)
        # wobble speed amplitude * freq per axis; drift + wobble <= max_speed
        wobble_speed = (cfg.max_speed - drift) * rng.uniform(0, 1) / math.sqrt(2)
        obj.wobble = wobble_speed / obj.wobble_freq * rng.choice([-1.0, 1.0], size=2)
        obj.wobble_phase = rng.uniform(0, 2 * math.pi, size=2)
        obj.theta0 = float(rng.uniform(0, 2 * math.pi))
        obj.omega = math.radians(cfg.max_rotation) * float(rng.uniform(-1, 1))
        obj.deform_amp = cfg.deform * float(rng.uniform(0.3, 1.0))
        obj.deform_freq = 2 * math.pi / float(rng.uniform(6, 16))
        obj.deform_phase = rng.uniform(0, 2 * math.pi, size=2)
    if cfg.occlusion and len(objects) > 1 and T > 2:
        # aim some objects at another one's position mid-video so that occlusions happen
        for k in range(1, len(objects)):
            if rng.uniform() < 0.5:
                target = objects[int(rng.integers(k))]
                tm = float(rng.uniform(0.4, 0.8)) * (T - 1)
                meet = target.p0 + target.velocity * tm
                v = (meet - objects[k].p0) / tm
                speed = float(np.linalg.norm(v))
                cap = 0.8 * cfg.max_speed
                objects[k].velocity = v if speed <= cap else v * (cap / speed)


def _camera_path(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Camera offsets ``(T, 2)`` in whole pixels: a slow sinusoidal pan per axis starting at 0, speed <=
    camera_pan px/frame (before rounding)."""
    t = np.arange(cfg.num_frames, dtype=np.float64)
    out = np.zeros((cfg.num_frames, 2))
    for axis in range(2):
        freq = 2 * math.pi / rng.uniform(48, 96)
        speed = cfg.camera_pan * rng.uniform(-1, 1)
        phase = rng.uniform(0, 2 * math.pi)
        amp = speed / freq
        out[:, axis] = amp * (np.sin(freq * t + phase) - math.sin(phase))
    # whole pixels: the background is rendered once on a canvas and cropped (see _background_canvas)
    return np.rint(out)


def _layout_ok(cfg: SynthConfig, scene: _Scene, xs: np.ndarray, ys: np.ndarray) -> bool:
    """Check the frame-0 visibility rule and, without occlusion, that no two objects overlap in any frame."""
    poses = [_pose(o, cfg.num_frames, cfg.height, cfg.width) for o in scene.objects]
    if not cfg.occlusion:
        # bounding circles apart in every frame: no overlap; otherwise compare the pixels
        circles_apart = True
        for i in range(len(poses)):
            for j in range(i + 1, len(poses)):
                gap = np.linalg.norm(poses[i][0] - poses[j][0], axis=1)
                oi, oj = scene.objects[i], scene.objects[j]
                reach = (oi.radius * (1 + oi.deform_amp) * poses[i][2]
                         + oj.radius * (1 + oj.deform_amp) * poses[j][2])
                circles_apart &= bool(np.all(gap > reach + 1))
        if not circles_apart:
            for t in range(1, cfg.num_frames):
                mask, areas = _render_masks(scene, t, poses, xs, ys)
                if areas.sum() != np.count_nonzero(mask):  # some pixel is covered twice
                    return False
    mask, areas = _render_masks(scene, 0, poses, xs, ys)
    if not cfg.occlusion and areas.sum() != np.count_nonzero(mask):
        return False
    for k, obj in enumerate(scene.objects):
        full = areas[k]
        if full < 9 or (mask == obj.id).sum() < cfg.min_first_visible * full:
            return False
    return True


def _draw_scene(rng: np.random.Generator, cfg: SynthConfig, xs: np.ndarray, ys: np.ndarray) -> _Scene:
    short = min(cfg.height, cfg.width)
    palette = _draw_palette(rng, cfg.num_colours)
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    bg_kind = str(rng.choice(_BACKGROUND_TEXTURES))
    background = _draw_texture(rng, bg_kind, palette, float(rng.uniform(*cfg.background_period)) * short)
    kinds = [k for k in _TEXTURES if k != bg_kind]
    order = list(rng.permutation(len(kinds)))
    objects = []
    for i in range(n_obj):
        kind = kinds[order[i % len(kinds)]]
        n_col = int(rng.integers(2, min(3, cfg.num_colours) + 1))
        if cfg.shared_palette:
            colours = palette[rng.choice(cfg.num_colours, size=n_col, replace=False)]
        else:
            colours = _draw_palette(rng, n_col)
        tex = _draw_texture(rng, kind, colours, float(rng.uniform(*cfg.texture_period)) * short)
        shape, params, radius = _draw_shape(rng, float(rng.uniform(*cfg.object_size)) * short)
        objects.append(_Object(id=i + 1, shape=shape, params=params, radius=radius, texture=tex))
    depth = [objects[int(i)] for i in rng.permutation(n_obj)]
    ramp = _ease(cfg.num_frames)
    contrast = 1 + cfg.lighting_drift * float(rng.uniform(-1, 1)) * ramp
    brightness = 255 * cfg.lighting_drift * float(rng.uniform(-1, 1)) * ramp
    scene = _Scene(background=background, objects=depth, camera=_camera_path(rng, cfg), contrast=contrast,
                   brightness=brightness, height=cfg.height, width=cfg.width)
    for attempt in range(_LAYOUT_ATTEMPTS):
        if attempt:  # a fresh layout: new shapes and sizes too (large objects may not fit apart)
            for obj in objects:
                obj.shape, obj.params, obj.radius = _draw_shape(rng, float(rng.uniform(*cfg.object_size)) * short)
        _draw_motion(rng, cfg, objects)
        if _layout_ok(cfg, scene, xs, ys):
            return scene
    raise ValueError(f"cannot place {n_obj} objects (object_size={cfg.object_size}, occlusion={cfg.occlusion}, "
                     f"min_first_visible={cfg.min_first_visible}) in {cfg.height}x{cfg.width} frames after "
                     f"{_LAYOUT_ATTEMPTS} attempts; use smaller objects, fewer objects or larger frames")


def _object_window(obj: _Object, centre: np.ndarray, scale: float, height: int,
                   width: int) -> tuple[slice, slice] | None:
    reach = obj.radius * (1 + obj.deform_amp) * scale + 1
    x0 = max(int(math.floor(centre[0] - reach)), 0)
    x1 = min(int(math.ceil(centre[0] + reach)) + 1, width)
    y0 = max(int(math.floor(centre[1] - reach)), 0)
    y1 = min(int(math.ceil(centre[1] + reach)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _local_coords(centre: np.ndarray, theta: float, scale: float, xs: np.ndarray,
                  ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse map image pixels ``(xs, ys)`` into object-local coordinates at scale 1."""
    dx = xs - np.float32(centre[0])
    dy = ys - np.float32(centre[1])
    c, s = math.cos(theta) / scale, math.sin(theta) / scale
    return np.float32(c) * dx + np.float32(s) * dy, np.float32(-s) * dx + np.float32(c) * dy


def _deform(obj: _Object, t: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-rigid warp of object-local coordinates at frame ``t``: each axis is shifted by a sinusoid of the other
    axis (about one wavelength across the object) whose phase travels with time, amplitude ``deform_amp * radius``."""
    if obj.deform_amp == 0:
        return u, v
    amp = np.float32(obj.deform_amp * obj.radius)
    k = np.float32(math.pi / obj.radius)  # wavelength = the object's diameter
    wt = obj.deform_freq * t
    du = amp * np.sin(k * v + np.float32(wt + obj.deform_phase[0]))
    dv = amp * np.sin(k * u + np.float32(wt + obj.deform_phase[1]))
    return u + du, v + dv


def _render_masks(scene: _Scene, t: int, poses: list, xs: np.ndarray,
                  ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``(H, W)`` uint8 and amodal areas ``(N,)`` (objects in scene order) of frame ``t``, no colours."""
    return _render_frame(scene, t, poses, xs, ys, canvas=None)[1:]


def _background_canvas(scene: _Scene) -> np.ndarray:
    """Background colour indices ``(H + span_y, W + span_x)`` covering every camera offset of the video.

    Pixel ``(i, j)`` of the canvas is world point ``(x, y) = (j + min camera x, i + min camera y)``.
    """
    lo = scene.camera.min(axis=0).astype(np.int64)
    hi = scene.camera.max(axis=0).astype(np.int64)
    xs, ys = _pixel_grid(scene.height + int(hi[1] - lo[1]), scene.width + int(hi[0] - lo[0]))
    return _texture_index(scene.background, xs + np.float32(lo[0]), ys + np.float32(lo[1]))


def _render_frame(scene: _Scene, t: int, poses: list, xs: np.ndarray, ys: np.ndarray,
                  canvas: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Render frame ``t``: image ``(H, W, 3)`` float32 before lighting (None without ``canvas``: masks only), mask
    ``(H, W)`` uint8 and amodal areas ``(N,)`` in scene (depth) order.

    ``canvas`` is :func:`_background_canvas`; the camera offset picks the window seen at ``t``.
    """
    h, w = scene.height, scene.width
    cam = scene.camera[t]
    img = None
    if canvas is not None:
        ox, oy = (cam - scene.camera.min(axis=0)).astype(np.int64)
        img = scene.background.colours[canvas[oy:oy + h, ox:ox + w]]
    mask = np.zeros((h, w), dtype=np.uint8)
    areas = np.zeros(len(scene.objects), dtype=np.int64)
    for k, (obj, (centres, theta, scale)) in enumerate(zip(scene.objects, poses)):
        centre = centres[t] - cam
        win = _object_window(obj, centre, float(scale[t]), h, w)
        if win is None:
            continue
        u, v = _local_coords(centre, float(theta[t]), float(scale[t]), xs[win], ys[win])
        u, v = _deform(obj, t, u, v)
        inside = _inside(obj, u, v)
        areas[k] = int(inside.sum())
        if not areas[k]:
            continue
        mask[win][inside] = obj.id
        if img is not None:
            img[win][inside] = obj.texture.colours[_texture_index(obj.texture, u[inside], v[inside])]
    return img, mask, areas


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    return xs, ys


def _generate(entropy: list[int], cfg: SynthConfig, name: str) -> SynthVideo:
    cfg.validate()
    rng = np.random.default_rng(entropy)
    xs, ys = _pixel_grid(cfg.height, cfg.width)
    scene = _draw_scene(rng, cfg, xs, ys)
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    poses = [_pose(o, T, H, W) for o in scene.objects]
    frames = np.empty((T, H, W, 3), dtype=np.uint8)
    masks = np.empty((T, H, W), dtype=np.uint8)
    n = len(scene.objects)
    areas = np.zeros((T, n), dtype=np.int64)
    centers = np.zeros((T, n, 2), dtype=np.float32)
    by_id = sorted(range(n), key=lambda k: scene.objects[k].id)  # scene order -> id order
    canvas = _background_canvas(scene)
    for t in range(T):
        img, mask, area = _render_frame(scene, t, poses, xs, ys, canvas=canvas)
        assert img is not None
        img = (img - 127.5) * np.float32(scene.contrast[t]) + np.float32(127.5 + scene.brightness[t])
        if cfg.noise_std > 0:
            img += np.float32(cfg.noise_std) * rng.standard_normal((H, W, 3), dtype=np.float32)
        np.clip(img, 0, 255, out=img)
        frames[t] = np.rint(img).astype(np.uint8)
        masks[t] = mask
        areas[t] = area[by_id]
        centers[t] = np.stack([poses[k][0][t] - scene.camera[t] for k in by_id])
    return SynthVideo(frames=frames, masks=masks, name=name, centers=centers, areas=areas,
                      depth_order=[o.id for o in scene.objects], camera=scene.camera.astype(np.float32))


def generate_video(index: int, cfg: SynthConfig, *, name: str | None = None) -> SynthVideo:
    """Generate video ``index`` of the synthetic set described by ``cfg`` (deterministic in ``(cfg.seed, index)``).

    Returns a :class:`SynthVideo` with ``frames (T, H, W, 3)`` uint8 RGB and ``masks (T, H, W)`` uint8 (ids 1..N);
    every object shows at least ``cfg.min_first_visible`` of its area in frame 0. ``name`` defaults to
    ``synth-<index:04d>``.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return _generate([cfg.seed, _STREAM_VIDEO, index], cfg, name if name is not None else f"synth-{index:04d}")


# ----------------------------------------------------------------------------------------------------------------
# DAVIS layout


def _davis_names(num_train: int, num_val: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(name, index) pairs; train takes even indices, val odd ones, so the splits never share a video."""
    train = [(f"synth-train-{i:04d}", 2 * i) for i in range(num_train)]
    val = [(f"synth-val-{i:04d}", 2 * i + 1) for i in range(num_val)]
    return train, val


def _davis_complete(root: Path, names: list[str], num_frames: int) -> bool:
    for name in names:
        for t in range(num_frames):
            if not (root / "JPEGImages/480p" / name / f"{t:05d}.jpg").is_file():
                return False
            if not (root / "Annotations/480p" / name / f"{t:05d}.png").is_file():
                return False
    return True


def write_davis(root: str | os.PathLike, cfg: SynthConfig, *, num_train: int, num_val: int) -> Path:
    """Write a DAVIS-2017-layout synthetic dataset under ``root`` and return ``root``.

    Layout: ``JPEGImages/480p/<name>/00000.jpg`` (JPEG quality 95), ``Annotations/480p/<name>/00000.png`` (mode
    ``P``, DAVIS palette, ids 1..N), ``ImageSets/2017/train.txt`` and ``val.txt`` (names ``synth-train-0000``,
    ``synth-val-0000``, ...; train uses even and val odd generator indices), and ``synth.json`` with the config.
    The folder name ``480p`` is the DAVIS convention; frames have the config's size.

    Cached: a ``root`` already holding a complete tree written with the same config and counts is returned as is.
    A ``root`` holding anything else (a tree with another config, or files without ``synth.json``) raises
    ``FileExistsError`` naming the folder; nothing is overwritten.
    """
    cfg.validate()
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(f"write_davis: need num_train >= 0, num_val >= 0 and at least one video, "
                         f"got num_train={num_train}, num_val={num_val}")
    root = Path(root)
    train, val = _davis_names(num_train, num_val)
    meta = {
        "format": "vidssl-synthetic-davis",
        "generator_version": GENERATOR_VERSION,
        "config": to_dict(cfg),
        "num_train": num_train,
        "num_val": num_val,
    }
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back
    manifest = root / "synth.json"
    names = [n for n, _ in train + val]
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder; expected a folder for the synthetic DAVIS tree")
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise FileExistsError(f"{root}: synth.json is unreadable ({exc}); not overwriting this folder") from exc
        if not isinstance(existing, dict):
            raise FileExistsError(f"{root}: synth.json is not a JSON object; not overwriting this folder")
        recorded = {k: existing.get(k) for k in meta}
        if recorded != meta:
            differ = sorted(k for k in meta if recorded[k] != meta[k])
            if existing.get("config") and meta["config"] and isinstance(existing["config"], dict):
                differ += sorted(f"config.{k}" for k in meta["config"]
                                 if existing["config"].get(k) != meta["config"][k])
            raise FileExistsError(f"{root}: holds a synthetic tree made with different settings "
                                  f"({', '.join(differ)}); delete it or choose another folder")
        lists_ok = all(
            (root / "ImageSets/2017" / f"{split}.txt").is_file()
            and (root / "ImageSets/2017" / f"{split}.txt").read_text().split() == [n for n, _ in pairs]
            for split, pairs in (("train", train), ("val", val)))
        if existing.get("complete") is True and lists_ok and _davis_complete(root, names, cfg.num_frames):
            return root
    elif root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root}: folder is not empty and holds no synth.json; refusing to write a synthetic "
                              "DAVIS tree into it (choose an empty or new folder)")
    # ours (or new): mark incomplete first, so an interrupted run is recognised and redone
    atomic_write_text(manifest, json.dumps({**meta, "complete": False}, indent=2) + "\n")
    for split, pairs in (("train", train), ("val", val)):
        for name, index in pairs:
            video = generate_video(index, cfg, name=name)
            if split == "val":
                present = set(np.unique(video.masks[0]).tolist()) - {0}
                if present != set(range(1, video.num_objects + 1)):
                    raise RuntimeError(f"{name}: first frame lacks object ids "
                                       f"{sorted(set(range(1, video.num_objects + 1)) - present)}")
            _write_davis_video(root, video)
        atomic_write_text(root / "ImageSets/2017" / f"{split}.txt", "".join(f"{n}\n" for n, _ in pairs))
    atomic_write_text(manifest, json.dumps({**meta, "complete": True}, indent=2) + "\n")
    return root


def _write_davis_video(root: Path, video: SynthVideo) -> None:
    img_dir = root / "JPEGImages/480p" / video.name
    ann_dir = root / "Annotations/480p" / video.name
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    for t in range(video.frames.shape[0]):
        with atomic_path(img_dir / f"{t:05d}.jpg") as tmp:
            Image.fromarray(video.frames[t], mode="RGB").save(tmp, format="JPEG", quality=95)
        write_label_png(ann_dir / f"{t:05d}.png", video.masks[t])


# ----------------------------------------------------------------------------------------------------------------
# encoded video


def write_videos(out_dir: str | os.PathLike, cfg: SynthConfig, *, num_videos: int, lossless: bool = False,
                 fps: int | float | Fraction = 25) -> list[Path]:
    """Write videos ``0..num_videos-1`` as ``<out_dir>/synth-0000.mp4``, ...; returns the paths.

    H.264 through :func:`vidssl.io.write_video`: ``lossless`` = ``libx264rgb`` at crf 0 (bit-exact), else ``libx264``
    ``yuv420p`` at the encoder's default quality (even sizes only).
    """
    if num_videos < 1:
        raise ValueError(f"write_videos: num_videos must be >= 1, got {num_videos}")
    cfg.validate()
    out_dir = Path(out_dir)
    paths = []
    for i in range(num_videos):
        video = generate_video(i, cfg)
        paths.append(write_video(out_dir / f"{video.name}.mp4", video.frames, fps=fps, lossless=lossless))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# multi-shot videos


def generate_multishot(index: int, cfg: SynthConfig, *, num_shots: int = 3) -> MultiShotVideo:
    """``num_shots`` different scenes joined with hard cuts (deterministic in ``(cfg.seed, index)``).

    Shot lengths are drawn in ``[max(2, T // 2), T + T // 2]`` with ``T = cfg.num_frames``; every shot has its own
    palette, background and objects. ``cuts`` lists the first frame of shots 2..num_shots.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, _STREAM_SHOT_LENGTHS, index])
    T = cfg.num_frames
    lengths = rng.integers(max(2, T // 2), max(2, T + T // 2) + 1, size=num_shots)
    shots = [_generate([cfg.seed, _STREAM_SHOT, index, s], replace(cfg, num_frames=int(n)), name=f"shot-{s}")
             for s, n in enumerate(lengths)]
    cuts = np.cumsum(lengths)[:-1].tolist()
    return MultiShotVideo(frames=np.concatenate([s.frames for s in shots]), masks=[s.masks for s in shots],
                          cuts=[int(c) for c in cuts], name=f"synth-shots-{index:04d}")


def write_multishot(out_dir: str | os.PathLike, cfg: SynthConfig, *, num_videos: int, num_shots: int = 3,
                    fps: int | float | Fraction = 25, lossless: bool = False) -> list[Path]:
    """Write ``<name>.mp4`` plus ``<name>.json`` (``{"num_frames", "cuts", "fps"}``) per multi-shot video.

    Returns the mp4 paths. ``fps`` is recorded as a number (float) in the JSON.
    """
    if num_videos < 1:
        raise ValueError(f"write_multishot: num_videos must be >= 1, got {num_videos}")
    out_dir = Path(out_dir)
    paths = []
    for i in range(num_videos):
        video = generate_multishot(i, cfg, num_shots=num_shots)
        path = write_video(out_dir / f"{video.name}.mp4", video.frames, fps=fps, lossless=lossless)
        info = {"num_frames": video.num_frames, "cuts": video.cuts, "fps": float(Fraction(fps))}
        atomic_write_text(out_dir / f"{video.name}.json", json.dumps(info) + "\n")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# frames that carry their own index

_INDEX_ROWS = 4
_INDEX_COLS = 4
_INDEX_BITS = _INDEX_ROWS * _INDEX_COLS


def _index_cells(height: int, width: int) -> list[tuple[slice, slice, slice, slice]]:
    """Per bit: (full cell rows, full cell cols, inner rows, inner cols), MSB first, row-major."""
    cells = []
    for b in range(_INDEX_BITS):
        r, c = divmod(b, _INDEX_COLS)
        y0, y1 = r * height // _INDEX_ROWS, (r + 1) * height // _INDEX_ROWS
        x0, x1 = c * width // _INDEX_COLS, (c + 1) * width // _INDEX_COLS
        qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
        cells.append((slice(y0, y1), slice(x0, x1), slice(y0 + qy, y1 - qy), slice(x0 + qx, x1 - qx)))
    return cells


def frame_index_video(num_frames: int, height: int, width: int) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 whose 4x4 grid of black/white blocks spells the frame index in binary.

    Bit 15 (MSB) is the top-left block, row-major; white = 1. The blocks are large, so the index survives lossy
    coding; :func:`decode_frame_index` reads it back. Needs ``num_frames <= 65536`` and ``height, width >= 16``.
    """
    if not 1 <= num_frames <= 1 << _INDEX_BITS:
        raise ValueError(f"num_frames must lie in 1..{1 << _INDEX_BITS}, got {num_frames}")
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be >= 16, got {height}x{width}")
    out = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    idx = np.arange(num_frames)
    for b, (rows, cols, _, _) in enumerate(_index_cells(height, width)):
        bit = (idx >> (_INDEX_BITS - 1 - b)) & 1
        out[:, rows, cols, :] = (255 * bit).astype(np.uint8)[:, None, None, None]
    return out


def decode_frame_index(frame: np.ndarray) -> int:
    """Read the index of a :func:`frame_index_video` frame (``(H, W, 3)``, ``(3, H, W)`` or ``(H, W)``; numpy or a
    CPU tensor). Raises ``ValueError`` when a block is neither clearly black nor clearly white."""
    arr = np.asarray(frame)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        grey = arr.astype(np.float32).mean(axis=-1)
    elif arr.ndim == 3 and arr.shape[0] == 3:
        grey = arr.astype(np.float32).mean(axis=0)
    elif arr.ndim == 2:
        grey = arr.astype(np.float32)
    else:
        raise ValueError(f"frame must be (H, W, 3), (3, H, W) or (H, W), got shape {arr.shape}")
    value = 0
    for b, (_, _, rows, cols) in enumerate(_index_cells(*grey.shape)):
        level = float(grey[rows, cols].mean())
        if 64 < level < 192:
            raise ValueError(f"block {b} has mean level {level:.0f}, neither black nor white: not a "
                             "frame_index_video frame")
        value = (value << 1) | int(level >= 128)
    return value


__all__ = [
    "GENERATOR_VERSION",
    "MultiShotVideo",
    "SynthConfig",
    "SynthVideo",
    "decode_frame_index",
    "frame_index_video",
    "generate_multishot",
    "generate_video",
    "write_davis",
    "write_multishot",
    "write_videos",
]
