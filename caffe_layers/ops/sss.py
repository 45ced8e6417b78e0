"""Post-processing of Semantic Soft Segmentation features (Aksoy et al., SIGGRAPH 2018, section 3.5).

The specification is the authors' MATLAB (yaksoy/SemanticSoftSegmentation, preprocessFeatures.m) and the
MATLAB imguidedfilter it calls:

    clip to [-5, 5] -> guided filter of every channel with the image as guide (neighbourhood 10,
    DegreeOfSmoothing 0.01 for an image in [0, 1]) -> PCA to 3 dimensions -> each channel to [0, 1].

Tensors are NCHW. The guide is the RGB image in [0, 1] (MATLAB's im2double), shape (N, 3, H, W) or
(N, 1, H, W). Every function works per image, is differentiable (autograd) and keeps dtype and device.
"""
import torch
import torch.nn.functional as F


def _pair(size):
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"sss: neighbourhood size must be a positive int or (h, w), got {size}")
    return size


def _check_nchw(x, what):
    if x.dim() != 4:
        raise ValueError(f"sss: {what} must be NCHW (4 axes), got shape {tuple(x.shape)}")


def box_mean(x, size):
    """MATLAB's meanBoxFilter: the mean over an h x w window with replicate padding.

    For an even size the window is not centred: MATLAB's kernel centre is floor((size + 1) / 2)
    (1-based), so a window of 10 covers offsets -4..+5. The divisor is always h * w (replicated
    border pixels count), unlike He et al.'s code, which divides by the number of pixels inside.
    """
    _check_nchw(x, "box_mean input")
    kh, kw = _pair(size)
    # pad before = centre - 1, after = size - centre (centre 1-based)
    ch, cw = (kh + 1) // 2, (kw + 1) // 2
    xp = F.pad(x, (cw - 1, kw - cw, ch - 1, kh - ch), mode="replicate")
    return F.avg_pool2d(xp, (kh, kw), stride=1)


def guided_filter(p, guide, size=10, eps=0.01):
    """MATLAB imguidedfilter(p, guide, 'NeighborhoodSize', size, 'DegreeOfSmoothing', eps), per image.

    Like MATLAB, the mode follows the channel counts: a 1-channel p with a 3-channel guide uses the
    colour-covariance filter (He et al. eq. 19-21); equal counts filter channel k of p with channel k
    of the guide; a 1-channel guide guides every channel of p.
    """
    _check_nchw(p, "guided_filter input")
    _check_nchw(guide, "guided_filter guide")
    cp, cg = p.shape[1], guide.shape[1]
    if p.shape[0] != guide.shape[0] or p.shape[2:] != guide.shape[2:]:
        raise ValueError(f"sss.guided_filter: input {tuple(p.shape)} and guide {tuple(guide.shape)} "
                         "must have the same N, H and W")
    guide = guide.to(p.dtype)
    if cg > cp:
        if cp != 1 or cg != 3:
            raise ValueError(f"sss.guided_filter: a colour guide needs a 1-channel input, got {cp} "
                             f"channels with a {cg}-channel guide (MATLAB accepts 1 or 3 channels)")
        return _guided_color(p, guide, size, eps)
    if cg != cp and cg != 1:
        raise ValueError(f"sss.guided_filter: guide must have 1 channel or as many as the input "
                         f"({cp}), got {cg}")
    return _guided_gray(p, guide.expand_as(p), size, eps)


def _guided_gray(p, g, size, eps):
    mean_g, mean_p = box_mean(g, size), box_mean(p, size)
    var_g = box_mean(g * g, size) - mean_g * mean_g
    cov_gp = box_mean(g * p, size) - mean_g * mean_p
    a = cov_gp / (var_g + eps)
    b = mean_p - a * mean_g
    return box_mean(a, size) * g + box_mean(b, size)


def _guided_color(p, g, size, eps):
    """Every channel of p filtered with the 3-channel guide g: the guide's statistics and its per-pixel
    3x3 covariance are computed once for all channels."""
    n, c, h, w = p.shape
    mean_g = box_mean(g, size)                                   # (N, 3, H, W)
    mean_p = box_mean(p, size)                                   # (N, C, H, W)
    gp = (g.unsqueeze(2) * p.unsqueeze(1)).reshape(n, 3 * c, h, w)
    cov_gp = box_mean(gp, size).reshape(n, 3, c, h, w) - mean_g.unsqueeze(2) * mean_p.unsqueeze(1)
    # 3x3 covariance of the guide per pixel, + eps on the diagonal
    gg = (g.unsqueeze(1) * g.unsqueeze(2)).reshape(n, 9, h, w)
    mm = (mean_g.unsqueeze(1) * mean_g.unsqueeze(2)).reshape(n, 9, h, w)
    sigma = (box_mean(gg, size) - mm).reshape(n, 3, 3, h, w).permute(0, 3, 4, 1, 2)
    sigma = sigma + eps * torch.eye(3, dtype=p.dtype, device=p.device)
    a = torch.linalg.solve(sigma, cov_gp.permute(0, 3, 4, 1, 2))   # (N, H, W, 3, C)
    a = a.permute(0, 3, 4, 1, 2)                                 # (N, 3, C, H, W)
    b = mean_p - (a * mean_g.unsqueeze(2)).sum(1)
    mean_a = box_mean(a.reshape(n, 3 * c, h, w), size).reshape(n, 3, c, h, w)
    return (mean_a * g.unsqueeze(2)).sum(1) + box_mean(b, size)


def filter_features(features, image, size=10, eps=0.01, grouping="matlab"):
    """Guided filtering of every feature channel with the image as guide (preprocessFeatures.m).

    grouping="matlab" (default) reproduces the released code: channels are passed to imguidedfilter
    three at a time, and since a 3-channel input with a 3-channel guide is filtered channel by
    channel, channel 3k+j is guided by image channel j alone (R, G or B); only the C mod 3 leftover
    channels get the colour-covariance filter. grouping="color" applies the colour guided filter of
    He et al. to every channel, as the paper describes.
    """
    _check_nchw(features, "filter_features features")
    _check_nchw(image, "filter_features image")
    if image.shape[1] != 3:
        raise ValueError(f"sss.filter_features: image must be RGB (N, 3, H, W), got {tuple(image.shape)}")
    if grouping not in ("matlab", "color"):
        raise ValueError(f"sss.filter_features: grouping must be 'matlab' or 'color', got {grouping!r}")
    image = image.to(features.dtype)
    full = features.shape[1] - features.shape[1] % 3 if grouping == "matlab" else 0
    out = []
    if full:  # channel 3k + j guided by image channel j alone
        out.append(_guided_gray(features[:, :full], image.repeat(1, full // 3, 1, 1), size, eps))
    if full < features.shape[1]:
        out.append(_guided_color(features[:, full:], image, size, eps))
    return torch.cat(out, 1)


def pca(features, dim=3):
    """Per-image PCA: project the centred C-d pixel features on the top `dim` principal axes.

    As featuresPCA in preprocessFeatures.m (eigenvectors of the unnormalised covariance, largest
    eigenvalue first). MATLAB's eigs leaves each eigenvector's sign arbitrary; here the sign is fixed
    so that the component of largest magnitude is positive, which makes the result deterministic.
    """
    _check_nchw(features, "pca features")
    n, c, h, w = features.shape
    if not 1 <= dim <= c:
        raise ValueError(f"sss.pca: dim must be in [1, {c}] for {c} channels, got {dim}")
    x = features.reshape(n, c, h * w)
    x = x - x.mean(2, keepdim=True)
    covar = x @ x.transpose(1, 2)                                # (N, C, C)
    _, vecs = torch.linalg.eigh(covar)                           # ascending eigenvalues
    vecs = vecs[:, :, -dim:].flip(-1)                            # (N, C, dim), largest first
    idx = vecs.abs().argmax(1, keepdim=True)
    vecs = vecs * torch.sign(torch.gather(vecs, 1, idx))
    return (vecs.transpose(1, 2) @ x).reshape(n, dim, h, w)


def normalize01(x, safe=False):
    """Each channel of each image shifted and scaled to [0, 1] (min to 0, then divided by max).

    A constant channel gives 0/0 = NaN, as in the original; safe=True leaves it at 0 instead.
    """
    _check_nchw(x, "normalize01 input")
    lo = x.amin((2, 3), keepdim=True)
    x = x - lo
    hi = x.amax((2, 3), keepdim=True)
    if safe:
        hi = torch.where(hi > 0, hi, torch.ones_like(hi))
    return x / hi


def preprocess_features(features, image, size=10, eps=0.01, dim=3, clip=5.0, grouping="matlab", safe=False):
    """The whole of preprocessFeatures.m: clip, guided filter, PCA to `dim`, [0, 1] per channel.

    image=None skips the filtering, as the original does without an image.
    """
    f = features.clamp(-clip, clip) if clip is not None else features
    if image is not None:
        f = filter_features(f, image, size, eps, grouping)
    return normalize01(pca(f, dim), safe)
