"""Inference rewrite: Convolution -> BatchNorm (global statistics) [-> Scale] [-> ReLU] as one convolution whose
weights and bias are folded in the graph (w * a, (b - mean) * a + shift with a = scale / sqrt(var + eps)) and
the ReLU applied to its fresh output, so the net makes one pass over the activations instead of four. Only for a TEST net whose BatchNorm uses its stored
statistics; the folded weights are computed from the layers' own blobs at each call, so loaded or changed
weights are always used, and gradients still reach every blob. The results equal the unfolded layers' up to
float rounding (tests/test_torch_face.py checks the golden tolerances).

Outside autograd (no_grad, inference_mode) the folded weights are kept between calls and made again only when
one of the blobs changes: its version counter (every in-place write through torch), its storage (load, `.to`,
`.half`) or its identity. Writes that bypass the version counter (through `.data` or a numpy view) are not
seen: call `clear_fold_cache()` after them. Under autograd and while tracing (torch.compile, torch.export,
make_fx, functorch) nothing is cached: the weights are folded in the graph. A kept float32 CPU convolution with
a kernel larger than 1x1 runs on oneDNN directly, its weights kept in oneDNN's layout and the ReLU fused; a 1x1
one (no padding, one group) as one GEMM over the channels-last pixels; both hand back channels-last tops, so a
ResNet runs in that layout from convolution to convolution without layout copies (not inside
`native.disabled()`: there every step is computed as an exported graph computes it).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

from caffe_layers import native
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


# weight blob -> {(ids of all the blobs, eps, reordered for oneDNN): (their versions and storages, weight, bias)}
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


def _onednn_ready(x, weight):
    """Whether oneDNN runs this convolution with its weights kept in oneDNN's layout: a float32 CPU one with
    a kernel larger than 1x1 (30% faster than F.conv2d at res deploy's sizes; a 1x1 one gains little and
    its kept layout can be tens of times slower at another input size)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and weight.shape[-1] * weight.shape[-2] > 1
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _cached_fold(blobs, eps, onednn_args=None):
    """The kept (weight, bias) of these blobs, made again where one changed. With `onednn_args` ((input
    shape, stride, pad, dilation, group) of the first call) the weight is kept reordered for oneDNN (the
    same reordered weight serves other input sizes at the same speed)."""
    weight = blobs[0]
    present = [t for t in blobs if t is not None]
    key = (tuple(id(t) if t is not None else None for t in blobs), eps, onednn_args is not None)
    stamp = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in present)
    entries = _fold_cache.setdefault(weight, {})
    entry = entries.get(key)
    if entry is None or entry[0] != stamp:
        w, b = fold_weights(*blobs[:5], eps, *blobs[5:])
        if onednn_args is not None:
            shape, stride, pad, dilation, group = onednn_args
            w = torch.ops.mkldnn._reorder_convolution_weight(w.contiguous(memory_format=torch.channels_last),
                                                             list(pad), list(stride), list(dilation), group,
                                                             list(shape))
        entry = entries[key] = (stamp, w, b)
    return entry[1], entry[2]


def _pointwise_gemm_ready(x, weight, pad, group):
    """Whether a kept float32 CPU 1x1 convolution (no padding, one group) runs as one GEMM over the
    channels-last pixels: [N*H*W, C] @ weight^T, the bias in the GEMM, the top channels-last."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and weight.shape[-1] == weight.shape[-2] == 1 and not any(pad) and group == 1)


def folded_convolution(x, weight, bias, mean, var, factor, eps, scale, shift, stride, pad, dilation, group,
                       relu=False):
    """The folded step. Its kept float32 CPU paths hand back a channels-last top (the next convolution reads
    it without a layout copy); TorchNet's graph makes it contiguous before a step that wants the plain one."""
    blobs = (weight, bias, mean, var, factor, scale, shift)
    if _cacheable([t for t in blobs if t is not None]):
        if native.enabled() and _onednn_ready(x, weight):  # oneDNN, weights in its layout, the ReLU fused
            w, b = _cached_fold(blobs, eps, (tuple(x.shape), stride, pad, dilation, group))
            x = x.contiguous(memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, stride, dilation, group,
                                                           "relu" if relu else "none", [], "")
        w, b = _cached_fold(blobs, eps)
        if native.enabled() and _pointwise_gemm_ready(x, w, pad, group):
            if stride[0] != 1 or stride[1] != 1:
                x = x[:, :, ::stride[0], ::stride[1]]
            n, c, h, wd = x.shape
            y = torch.addmm(b, x.permute(0, 2, 3, 1).reshape(-1, c), w.reshape(w.shape[0], c).t())
            if relu:
                y.clamp_min_(0)
            return y.view(n, h, wd, -1).permute(0, 3, 1, 2)
    else:
        w, b = fold_weights(weight, bias, mean, var, factor, eps, scale, shift)
    y = F.conv2d(x, w, b, stride, pad, dilation, group)
    return F.relu(y, inplace=True) if relu else y  # (conv2d's backward does not read its output)


@dataclass
class FoldedConvolution:
    """A step's layer: the Convolution, its BatchNorm, optional Scale and optional ReLU (negative_slope 0),
    run as folded_convolution."""
    conv: object
    bn: object
    scale: object = None
    relu: object = None

    @property
    def name(self):
        return self.conv.name

    @property
    def param(self):
        return self.conv.param

    def arguments(self, blob):
        """folded_convolution's arguments after x; `blob(layer, i)` gives a layer's i-th blob (a tensor, or a
        graph node in TorchNet's graph)."""
        conv, bn, sc = self.conv, self.bn, self.scale
        scale = blob(sc, 0) if sc is not None else None
        shift = blob(sc, len(sc.blobs) - 1) if sc is not None and sc.bias_term else None
        return (blob(conv, 0), blob(conv, 1) if conv.bias_term else None, blob(bn, 0), blob(bn, 1), blob(bn, 2),
                bn.eps, scale, shift, tuple(conv.stride), tuple(conv.pad), tuple(conv.dilation), conv.group,
                self.relu is not None)

    def __call__(self, x):
        """folded_convolution of `x` with the layers' current blobs (the pycaffe face's call)."""
        return folded_convolution(x, *self.arguments(lambda layer, i: layer.blobs[i]))


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


_ROLES = {"Convolution": "conv", "BatchNorm": "bn", "Scale": "scale", "ReLU": "relu"}


def fold_batchnorm(steps, needed):
    """`steps` with every foldable Convolution -> BatchNorm [-> Scale] [-> ReLU] replaced by one folded step;
    `needed`: blobs that must keep their own values (outputs, kept blobs)."""
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
        if len(chain) == 1:
            out.append(step)
            continue
        blob = steps[last].tops[0]
        readers = _version_readers(steps, last, blob)
        if (len(readers) == 1 and _kind(steps[readers[0]], "ReLU") and steps[readers[0]].layer.negative_slope == 0
                and (blob == steps[readers[0]].tops[0] or blob not in needed)):
            chain.append(readers[0])
        if any(steps[j].loss_weights and any(steps[j].loss_weights) for j in chain):
            out.append(step)
            continue
        folded = FoldedConvolution(**{_ROLES[steps[j].layer.param.type]: steps[j].layer for j in chain})
        out.append(Step(folded, list(step.bottoms), list(steps[chain[-1]].tops), list(step.propagate_down),
                        list(steps[chain[-1]].loss_weights)))
        skip.update(chain[1:])
    return out
