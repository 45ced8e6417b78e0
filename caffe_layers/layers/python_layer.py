"""Python: a layer written in Python against pycaffe's interface (setup/reshape/forward/backward).

The class named by python_param is imported from python_param.module (found on sys.path or next to
the prototxt) and called with pycaffe-like blobs whose .data and .diff are numpy arrays.
"""
import contextlib
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.formats.prototxt import is_path


class PyBlob:
    """A pycaffe Blob as Python layers see it: numpy .data and .diff, reshape, shape accessors."""

    def __init__(self, data=None, diff=None):
        self.data = np.zeros(0, np.float32) if data is None else data
        self.diff = np.zeros_like(self.data) if diff is None else diff

    def reshape(self, *shape):
        shape = tuple(int(s) for s in (shape[0] if len(shape) == 1 and not np.isscalar(shape[0]) else shape))
        if shape != self.data.shape:
            self.data = np.zeros(shape, self.data.dtype)
            self.diff = np.zeros(shape, self.data.dtype)

    @property
    def shape(self):
        return self.data.shape

    @property
    def count(self):
        return int(self.data.size)

    def _axis(self, i):
        # pycaffe's legacy accessors: missing trailing axes count as 1
        return self.data.shape[i] if self.data.ndim > i else 1

    num = property(lambda self: self._axis(0))
    channels = property(lambda self: self._axis(1))
    height = property(lambda self: self._axis(2))
    width = property(lambda self: self._axis(3))


@contextlib.contextmanager
def module_search_path(prototxt):
    """Let Python layers import modules that sit next to the prototxt file (if it is a file)."""
    folder = None
    if isinstance(prototxt, (str, Path)) and is_path(prototxt):
        path = Path(prototxt)
        if path.is_file():
            folder = str(path.resolve().parent)
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _instantiate(cls, param):
    """Create the user's object the way pycaffe would, also for subclasses of caffe_layers.Layer."""
    obj = cls.__new__(cls)
    if isinstance(obj, nn.Module):
        nn.Module.__init__(obj)
    init = cls.__init__
    if init is not object.__init__ and init is not Layer.__init__ and init is not nn.Module.__init__:
        obj.__init__(param)  # pycaffe constructs python layers with the LayerParameter
    return obj


class _PythonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, *bottoms):
        bottom = [PyBlob(b.detach().cpu().numpy().copy()) for b in bottoms]
        tops = layer._run_forward(bottom)
        ctx.layer, ctx.bottom = layer, bottom
        ctx.top_data = [t.data.copy() for t in layer.top]
        ctx.like = bottoms[0]
        return tuple(tops)

    @staticmethod
    def backward(ctx, *grads):
        like = ctx.like
        top = [PyBlob(data, np.zeros_like(data) if g is None else g.detach().cpu().numpy().astype(data.dtype))
               for data, g in zip(ctx.top_data, grads)]
        for b in ctx.bottom:
            b.diff = np.zeros_like(b.data)
        down = list(ctx.needs_input_grad[1:])
        ctx.layer.py.backward(top, down, ctx.bottom)
        out = [torch.as_tensor(np.asarray(b.diff).reshape(b.data.shape), dtype=like.dtype, device=like.device)
               if d else None for b, d in zip(ctx.bottom, down)]
        return (None, *out)


@register("Python")
class Python(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.python_param
        if not p.module or not p.layer:
            raise ValueError(f"layer {self.name!r}: python_param needs both module and layer")
        try:
            module = importlib.import_module(p.module)
        except ImportError as err:
            raise ImportError(f"layer {self.name!r}: cannot import python_param.module {p.module!r} "
                              f"(looked next to the prototxt and on sys.path): {err}") from err
        if not hasattr(module, p.layer):
            raise ValueError(f"layer {self.name!r}: module {p.module!r} has no class {p.layer!r}")
        py = _instantiate(getattr(module, p.layer), param)
        py.param_str = p.param_str
        py.phase = phase
        object.__setattr__(self, "py", py)  # not a submodule: it works on numpy arrays
        self.top = [PyBlob() for _ in param.top]
        self.register_buffer("_marker", torch.empty(0), persistent=False)
        bottom = [PyBlob(np.zeros(s, np.float32)) for s in bottom_shapes]
        py.setup(bottom, self.top)
        py.reshape(bottom, self.top)

    def top_shapes(self, bottom_shapes):
        bottom = [PyBlob(np.zeros(s, np.float32)) for s in bottom_shapes]
        self.py.reshape(bottom, self.top)
        return [tuple(t.data.shape) for t in self.top]

    def _run_forward(self, bottom):
        dtype = torch.as_tensor(bottom[0].data).dtype if bottom else self._marker.dtype
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        for t in self.top:  # tops work in the net's precision (float32 as in pycaffe, or float64)
            if t.data.dtype != np_dtype:
                t.data, t.diff = t.data.astype(np_dtype), t.diff.astype(np_dtype)
        # Caffe's Layer::Forward calls Reshape before every Forward
        self.py.reshape(bottom, self.top)
        self.py.forward(bottom, self.top)
        return [torch.as_tensor(np.array(t.data, copy=True), dtype=dtype) for t in self.top]

    def forward(self, *bottoms):
        if not self.top:
            self._run_forward([PyBlob(b.detach().cpu().numpy().copy()) for b in bottoms])
            return ()
        if not bottoms or not torch.is_grad_enabled() or not any(b.requires_grad for b in bottoms):
            device = bottoms[0].device if bottoms else self._marker.device
            tops = self._run_forward([PyBlob(b.detach().cpu().numpy().copy()) for b in bottoms])
            tops = [t.to(device) for t in tops]
        else:
            tops = [t.to(bottoms[0].device) for t in _PythonFunction.apply(self, *bottoms)]
        return tops[0] if len(tops) == 1 else tuple(tops)
