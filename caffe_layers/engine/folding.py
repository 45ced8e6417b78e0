"""Inference rewrite: Convolution -> BatchNorm (global statistics) [-> Scale] as one convolution whose weights
and bias are folded in the graph (w * a, (b - mean) * a + shift with a = scale / sqrt(var + eps)), so the net
makes one pass over the activations instead of three. Only for a TEST net whose BatchNorm uses its stored
statistics; the folded weights are computed from the layers' own blobs at each call, so loaded or changed
weights are always used, and gradients still reach every blob. The results equal the unfolded layers' up to
float rounding (tests/test_torch_face.py checks the golden tolerances).

Outside autograd (no_grad, inference_mode) the folded weights are kept between calls and made again only when
one of the blobs changes: its version counter (every in-place write through torch), its storage (load, `.to`,
`.half`) or its identity. Writes that bypass the version counter (through `.data` or a numpy view) are not
seen: call `clear_fold_cache()` after them. Under autograd and while tracing (torch.compile, torch.export,
make_fx, functorch) nothing is cached: the weights are folded in the graph.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from caffe_layers.engine.plan import Step
from caffe_layers.formats.proto import TRAIN


def fold_weights(weight, bias, mean, var, factor, eps, scale, shift):
    """The folded convolution's (weight, bias)."""
    f = torch.where(factor[0] == 0, torch.zeros_like(factor[0]), 1 / factor[0])  # Caffe's stored-statistics rule
    a = torch.rsqrt(var * f + eps)
    if scale is not None:
        a = a * scale
    b = -mean * f * a if bias is None else (bias - mean * f) * a
    if shift is not None:
        b = b + shift
    return weight * a.reshape(-1, 1, 1, 1), b


# weight blob -> {(ids of all the blobs, eps): (their versions and storages, folded weight, folded bias)}
_fold_cache = WeakIdKeyDictionary()


def clear_fold_cache():
    """Forget every kept folded weight (needed only after writes that bypass torch's version counter)."""
    _fold_cache.clear()


def _cacheable(blobs):
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or torch.jit.is_tracing():
        return False
    if _get_current_dispatch_mode() is not None or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in blobs)


def _cached_fold(blobs, eps):
    weight = blobs[0]
    present = [t for t in blobs if t is not None]
    key = (tuple(id(t) if t is not None else None for t in blobs), eps)
    stamp = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in present)
    entries = _fold_cache.setdefault(weight, {})
    entry = entries.get(key)
    if entry is None or entry[0] != stamp:
        entry = entries[key] = (stamp, *fold_weights(*blobs[:5], eps, *blobs[5:]))
    return entry[1], entry[2]


def folded_convolution(x, weight, bias, mean, var, factor, eps, scale, shift, stride, pad, dilation, group):
    blobs = (weight, bias, mean, var, factor, scale, shift)
    if _cacheable([t for t in blobs if t is not None]):
        w, b = _cached_fold(blobs, eps)
    else:
        w, b = fold_weights(weight, bias, mean, var, factor, eps, scale, shift)
    return F.conv2d(x, w, b, stride, pad, dilation, group)


@dataclass
class FoldedConvolution:
    """A step's layer: the Convolution, its BatchNorm and optional Scale, run as folded_convolution."""
    conv: object
    bn: object
    scale: object = None

    @property
    def name(self):
        return self.conv.name

    @property
    def param(self):
        return self.conv.param


def _version_readers(steps, i, blob):
    """The steps after i that read the value step i wrote to `blob` (up to its next writer, included)."""
    readers = []
    for j in range(i + 1, len(steps)):
        if blob in steps[j].bottoms:
            readers.append(j)
        if blob in steps[j].tops:
            break
    return readers


def _kind(step, type_name):
    return step.layer.param.type == type_name and len(step.bottoms) == 1 and len(step.tops) == 1


def fold_batchnorm(steps, needed):
    """`steps` with every foldable Convolution -> BatchNorm [-> Scale] replaced by one folded step; `needed`:
    blobs that must keep their own values (outputs, kept blobs)."""
    out, skip = [], set()
    for i, step in enumerate(steps):
        if i in skip:
            continue
        conv = step.layer
        if not (_kind(step, "Convolution") and not conv.bottom_is_im2col and conv.nsp == 2 and conv.axis == 1):
            out.append(step)
            continue
        chain, last = [i], i
        for type_name in ("BatchNorm", "Scale"):
            blob = steps[last].tops[0]
            readers = _version_readers(steps, last, blob)
            if len(readers) != 1 or not _kind(steps[readers[0]], type_name):
                break
            nxt = steps[readers[0]]
            if blob != nxt.tops[0] and blob in needed:
                break
            bn = nxt.layer
            if type_name == "BatchNorm" and not (bn.use_global_stats and not (bn.phase == TRAIN and bn.update_global_stats)):
                break
            if type_name == "BatchNorm" and bn.scale_bias:  # NVIDIA caffe's own scale/bias blobs: not folded
                break
            if type_name == "Scale" and not (nxt.layer.axis in (1, -3) and len(nxt.layer.blobs) >= 1
                                             and tuple(nxt.layer.blobs[0].shape) == (conv.num_output,)):
                break
            chain.append(readers[0])
            last = readers[0]
        if len(chain) == 1 or any(steps[j].loss_weights and any(steps[j].loss_weights) for j in chain):
            out.append(step)
            continue
        layers = [steps[j].layer for j in chain]
        folded = FoldedConvolution(*layers)
        out.append(Step(folded, list(step.bottoms), list(steps[chain[-1]].tops), list(step.propagate_down),
                        list(steps[chain[-1]].loss_weights)))
        skip.update(chain[1:])
    return out
