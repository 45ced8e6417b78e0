"""Deterministic synthetic segmentation data: images made of regions that differ in colour and
texture (a Voronoi partition with wavy borders; flat, striped, checked or speckled fills) with their
label maps, and a VOC-like folder of them for the data layers (TwoImageData, ImageSegData).

Everything comes from numpy's RandomState(seed), so a (seed, size) pair always gives the same image.
"""
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURES = ("flat", "stripes", "checks", "speckle")


def _distinct_colours(rng, n, min_dist=90.0):
    """n RGB colours, pairwise at least `min_dist` apart where a few tries allow it."""
    colours = []
    for _ in range(n):
        best, best_d = None, -1.0
        for _ in range(30):
            c = rng.uniform(20, 235, 3)
            d = min((np.abs(c - o).sum() for o in colours), default=1e9)
            if d > best_d:
                best, best_d = c, d
            if d >= min_dist:
                break
        colours.append(best)
    return np.array(colours)


def _texture(rng, kind, yy, xx):
    """A zero-mean pattern in [-1, 1] over the whole grid."""
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4, 9)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == "stripes":
        return np.sign(np.sin(2 * np.pi * u / period))
    if kind == "checks":
        return np.sign(np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period))
    if kind == "speckle":
        return rng.uniform(-1, 1, yy.shape)
    return np.zeros(yy.shape)


def make_sample(seed, height=97, width=97, regions=(3, 7), noise=6.0):
    """(image HxWx3 uint8 RGB, labels HxW uint8) for one seed; labels are region ids 0..n-1."""
    if height < 8 or width < 8:
        raise ValueError(f"synthetic.make_sample: size must be at least 8x8, got {height}x{width}")
    lo, hi = regions if isinstance(regions, (tuple, list)) else (regions, regions)
    if not 1 <= lo <= hi <= 254:
        raise ValueError(f"synthetic.make_sample: regions must lie in 1..254, got {regions}")
    rng = np.random.RandomState(seed)
    n = int(rng.randint(lo, hi + 1))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    centres = rng.uniform(0, 1, (n, 2)) * [height, width]
    # wavy borders: displace the coordinates by a smooth random field before the nearest-centre test
    amp, freq, phase = rng.uniform(2, 5), rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi, 2)
    wy = yy + amp * np.sin(freq * xx + phase[0])
    wx = xx + amp * np.sin(freq * yy + phase[1])
    d = (wy[None] - centres[:, 0, None, None]) ** 2 + (wx[None] - centres[:, 1, None, None]) ** 2
    labels = d.argmin(0)
    present = np.unique(labels)  # a centre may own no pixel: renumber 0..k-1
    labels = np.searchsorted(present, labels)
    colours = _distinct_colours(rng, len(present))
    image = np.zeros((height, width, 3))
    for r in range(len(present)):
        kind = TEXTURES[rng.randint(len(TEXTURES))]
        pattern = _texture(rng, kind, yy, xx)
        contrast = rng.uniform(15, 40)
        tint = rng.uniform(0.5, 1.0, 3)
        fill = colours[r] + contrast * pattern[..., None] * tint
        image[labels == r] = fill[labels == r]
    image += rng.normal(0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_voc(root, count, height=97, width=97, seed=0, list_name="train", regions=(3, 7)):
    """Write `count` samples as root/JPEGImages/NNNNN.png (RGB), root/SegmentationClass/NNNNN.png
    (gray label ids) and root/list/<list_name>.txt ("JPEGImages/x.png SegmentationClass/x.png" per
    line, relative to root: give the data layer root_folder "<root>/"). Sample i uses seed + i.
    Returns the list file's path."""
    root = Path(root)
    if count < 1:
        raise ValueError(f"synthetic.write_voc: count must be >= 1, got {count}")
    for sub in ("JPEGImages", "SegmentationClass", "list"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image, labels = make_sample(seed + i, height, width, regions)
        name = f"{i:05d}.png"
        Image.fromarray(image, "RGB").save(root / "JPEGImages" / name)
        Image.fromarray(labels, "L").save(root / "SegmentationClass" / name)
        lines.append(f"JPEGImages/{name} SegmentationClass/{name}")
    list_file = root / "list" / f"{list_name}.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


def label_colours(labels, seed=12345):
    """A fixed RGB colour per label id (HxW -> HxWx3 float in [0, 1]), for pictures."""
    rng = np.random.RandomState(seed)
    table = rng.uniform(0.1, 0.95, (256, 3))
    return table[np.asarray(labels, dtype=np.int64)]
