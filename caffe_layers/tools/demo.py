"""`caffe-layers demo -o OUT_DIR`: the segmentation-aware demo (Harley et al. ICCV 2017, figures 3-4)
on the shipped sample image and embedding weights (caffe_layers/tools/demo_data, see tools/train_demo_embs.py).

Writes PNGs of the embeddings (PCA to RGB), local attention masks exp(-lambda * |e_i - e_j|_1) at a few
pixels, a blurry map before and after segmentation-aware bilateral filtering, and the SSS-style 3-d
features; prints how well the masks follow region boundaries and how much the filtering sharpens.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
MEAN_BGR = (104.008, 116.669, 122.675)  # the embs train config's mean_value
EMBEDDING = "weighted_avg"
OUTPUTS = ("input.png", "labels.png", "embeddings_pca.png", "masks.png", "blurry.png", "filtered.png",
           "sss_features.png")
# The DistLoss margins (0.5 same / 2 different) suggest lambda 1, but the shipped model, trained for
# only 1200 iterations, keeps distances about 10x larger (median 5.5 inside a region, 12.7 across).
LAMBDA = 0.5
FLT_BIG = 1e30  # distances at or above this are im2dist's FLT_MAX/100 markers (outside / centre)


def add_arguments(parser, command):
    parser.add_argument("-o", "--out", required=True, help="folder for the PNGs")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--lam", type=float, default=LAMBDA, help=f"mask sharpness lambda (default {LAMBDA})")
    parser.add_argument("--iterations", type=int, default=3, help="bilateral filtering passes (default 3)")
    parser.add_argument("--data", default=str(DEMO_DATA),
                        help="folder with deploy.prototxt, embs.caffemodel, sample.png, sample_labels.png "
                             "(default: the shipped ones; tools/train_demo_embs.py --out writes such a folder)")


def load_sample(data=DEMO_DATA):
    """(RGB uint8 HxWx3, labels uint8 HxW) of the sample in `data` (default: the shipped one)."""
    data = Path(data)
    for name in ("sample.png", "sample_labels.png", "deploy.prototxt", "embs.caffemodel"):
        if not (data / name).is_file():
            raise FileNotFoundError(f"demo: {data / name} is missing (a demo data folder holds sample.png, "
                                    f"sample_labels.png, deploy.prototxt and embs.caffemodel)")
    image = np.asarray(Image.open(data / "sample.png").convert("RGB"))
    labels = np.asarray(Image.open(data / "sample_labels.png"))
    return image, labels


def embed(image, data=DEMO_DATA):
    """The 1x64xHxW embedding of an RGB uint8 image by the deploy net and weights in `data`."""
    from caffe_layers.engine.net import Net

    data = Path(data)
    net = Net(str(data / "deploy.prototxt"), weights=str(data / "embs.caffemodel"), strict_weights=True)
    expected = tuple(net.blob_shapes["data"][2:])
    if image.shape[:2] != expected:
        raise ValueError(f"demo: the deploy net expects a {expected[0]}x{expected[1]} image, got {image.shape[:2]}")
    bgr = image[:, :, ::-1].astype(np.float32) - np.asarray(MEAN_BGR, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return net(data=x)[EMBEDDING]


def window_weights(emb, kernel, dilation, lam):
    """(1, k*k, H, W) weights exp(-lam * L1 distance) to each neighbour; 0 outside the image and at
    the centre (im2dist's FLT_MAX/100 markers)."""
    from caffe_layers.native import im2dist

    pad = (kernel // 2) * dilation
    dist = im2dist(emb, kernel, pad, 1, dilation, norm="L1", remove_center=True, remove_bounds=True,
                   true_gradient=True)
    return torch.exp(-lam * dist), dist < FLT_BIG


def mask_statistics(emb, labels, lam, kernel=5, dilation=3):
    """Mean mask weight over neighbour pairs in the same region and across a boundary (the deploy
    config's 5x5 dilation-3 window)."""
    from caffe_layers.native import im2parity

    weights, valid = window_weights(emb, kernel, dilation, lam)
    lab = torch.from_numpy(labels.astype(np.float32))[None, None]
    same = im2parity(lab, kernel, (kernel // 2) * dilation, 1, dilation) != 0
    inside = weights[valid & same].mean().item()
    across = weights[valid & ~same].mean().item()
    return inside, across


def bilateral(values, emb, lam, iterations, kernel=7, dilation=2):
    """Segmentation-aware bilateral filter: each pixel becomes the mask-weighted average of its
    window (centre included with weight 1), repeated `iterations` times."""
    from caffe_layers.ops.im2col import im2col

    weights, _ = window_weights(emb, kernel, dilation, lam)
    k2 = kernel * kernel
    weights[:, k2 // 2] = 1.0  # the centre: remove_center marked it, its weight is exp(0)
    norm = weights.sum(1, keepdim=True)
    pad = (kernel // 2) * dilation
    y = values
    for _ in range(iterations):
        cols = im2col(y, kernel, pad, 1, dilation).reshape(1, y.shape[1], k2, *y.shape[2:])
        y = (cols * weights[:, None]).sum(2) / norm
    return y


def boundary(labels):
    """Pixels whose label differs from their left or upper neighbour's."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edge


def boundary_band(labels, width=3):
    return ndimage.binary_dilation(boundary(labels), iterations=width)


def pick_pixels(labels):
    """Two pixels deep inside regions and two right next to a boundary (deterministic)."""
    edge_dist = ndimage.distance_transform_edt(~boundary(labels))
    h, w = labels.shape
    margin = np.zeros_like(edge_dist, bool)
    margin[12:h - 12, 12:w - 12] = True
    picks = []
    sizes = sorted(np.unique(labels), key=lambda r: -(labels == r).sum())  # the two largest regions
    for r in sizes[:2]:
        d = np.where((labels == r) & margin, edge_dist, -1)
        picks.append(np.unravel_index(d.argmax(), d.shape))
    near = np.argwhere((edge_dist == 2) & margin)
    picks += [tuple(near[len(near) // 3]), tuple(near[2 * len(near) // 3])]
    return [tuple(int(v) for v in p) for p in picks]


def mask_at(emb, y, x, lam, radius):
    """exp(-lam * L1 distance) from pixel (y, x) to its (2r+1)^2 window (0 outside the image)."""
    e = emb[0]
    h, w = e.shape[1:]
    out = torch.zeros(2 * radius + 1, 2 * radius + 1)
    y0, y1, x0, x1 = max(y - radius, 0), min(y + radius + 1, h), max(x - radius, 0), min(x + radius + 1, w)
    d = (e[:, y0:y1, x0:x1] - e[:, y, x, None, None]).abs().sum(0)
    out[y0 - y + radius:y1 - y + radius, x0 - x + radius:x1 - x + radius] = torch.exp(-lam * d)
    return out.numpy()


def to_png(array01, path, scale=1):
    a = np.clip(np.rint(np.asarray(array01) * 255), 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def mask_figure(image, emb, pixels, lam, radius=24, scale=3):
    """One row per pixel: the image window with the pixel marked, the mask (scaled so that its largest
    weight off the centre shows white), the mask on the image."""
    rows = []
    h, w = image.shape[:2]
    padded = np.zeros((h + 2 * radius, w + 2 * radius, 3))
    padded[radius:radius + h, radius:radius + w] = image / 255.0
    for y, x in pixels:
        crop = padded[y:y + 2 * radius + 1, x:x + 2 * radius + 1].copy()
        crop[radius - 1:radius + 2, radius - 1:radius + 2] = (1.0, 0.0, 0.0)
        m = mask_at(emb, y, x, lam, radius)
        off = m.copy()
        off[radius, radius] = 0
        m = np.minimum(m / max(off.max(), 1e-12), 1.0)[..., None]  # shown scaled to its largest off-centre weight
        rows.append(np.concatenate([crop, np.repeat(m, 3, 2), crop * m], 1))
        rows.append(np.ones((2, rows[-1].shape[1], 3)))
    fig = np.concatenate(rows[:-1], 0)
    return np.kron(fig, np.ones((scale, scale, 1)))


def run_demo(out, force=False, lam=LAMBDA, iterations=3, data=DEMO_DATA, log=print):
    """Run the demo into folder `out`; returns the measured figures as a dict."""
    from caffe_layers.ops import sss
    from caffe_layers.training.synthetic import label_colours

    start = time.time()
    out = Path(out)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise FileExistsError(f"demo: {out} already holds {', '.join(existing)}; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    image, labels = load_sample(data)
    emb = embed(image, data).double()

    rgb = torch.from_numpy(image.transpose(2, 0, 1) / 255.0)[None]
    pca_rgb = sss.normalize01(sss.pca(emb, 3), safe=True)[0].permute(1, 2, 0).numpy()
    features = sss.preprocess_features(emb.float(), rgb.float(), safe=True)[0].permute(1, 2, 0).numpy()

    inside, across = mask_statistics(emb, labels, lam)
    pixels = pick_pixels(labels)

    truth = label_colours(labels)
    blurry = np.stack([ndimage.gaussian_filter(truth[..., c], 3.0) for c in range(3)], 2)
    filtered = bilateral(torch.from_numpy(blurry.transpose(2, 0, 1))[None], emb, lam, iterations)
    filtered = filtered[0].permute(1, 2, 0).numpy()
    band = boundary_band(labels)
    err_blurry = float(np.abs(blurry - truth)[band].mean())
    err_filtered = float(np.abs(filtered - truth)[band].mean())

    to_png(image / 255.0, out / "input.png")
    to_png(truth, out / "labels.png")
    to_png(pca_rgb, out / "embeddings_pca.png")
    to_png(mask_figure(image, emb, pixels, lam), out / "masks.png")
    to_png(blurry, out / "blurry.png")
    to_png(filtered, out / "filtered.png")
    to_png(features, out / "sss_features.png")
    figures = {"mask_inside": inside, "mask_across": across, "boundary_error_blurry": err_blurry,
               "boundary_error_filtered": err_filtered, "pixels": pixels, "seconds": time.time() - start}
    log(f"attention masks (lambda {lam:g}, 5x5 window, dilation 3): mean weight of neighbours in the same "
        f"region {inside:.3f}, across a boundary {across:.3f}")
    log(f"mean |map - truth| within 3 px of a boundary: blurry {err_blurry:.4f}, after segmentation-aware "
        f"filtering ({iterations} passes) {err_filtered:.4f}")
    log(f"mask pixels (row, col): {pixels}; wrote {len(OUTPUTS)} PNGs to {out} in {figures['seconds']:.1f} s")
    return figures


def run(args):
    try:
        run_demo(args.out, args.force, args.lam, args.iterations, args.data)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0
