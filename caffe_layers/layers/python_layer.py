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


class ParamView(PyBlob):
    """A Python layer's parameter blob as pycaffe's Layer.blobs gives it: .data and .diff are numpy views of
    the torch layer's parameter and its gradient, so the net's params, weights files and solvers see them."""

    def __init__(self, layer, index):
        self._layer, self._index = layer, index

    @property
    def _param(self):
        return self._layer.blobs[self._index]  # looked up each time: share_with may put another one here

    @property
    def data(self):
        return self._param.detach().numpy()

    @data.setter
    def data(self, value):
        self.data[...] = value

    @property
    def diff(self):
        param = self._param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad.numpy()

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    def reshape(self, *shape):
        shape = tuple(int(s) for s in (shape[0] if len(shape) == 1 and not np.isscalar(shape[0]) else shape))
        if shape != self.data.shape:
            self._param.data = self._param.data.new_zeros(shape)
            self._param.grad = None


class ParamViews(list):
    """pycaffe's Layer.blobs of a Python layer: a list of ParamViews; `add_blob(*shape)` appends a
    zero-filled learnable blob (Caffe's Blob memory starts zeroed)."""

    def __init__(self, layer):
        super().__init__()
        self._layer = layer

    def add_blob(self, *shape):
        # not Layer.add_blob: the net's fill_blobs would overwrite what the user's setup writes
        self._layer.blobs.append(nn.Parameter(torch.zeros(tuple(int(s) for s in shape))))
        self.append(ParamView(self._layer, len(self._layer.blobs) - 1))


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
    """The user's forward and backward; the layer's parameters come last among the inputs only so that the
    tops need a gradient when they learn: the user's backward writes their diffs itself, as in Caffe."""

    @staticmethod
    def forward(ctx, layer, n_bottoms, *inputs):
        bottoms = inputs[:n_bottoms]
        bottom = [PyBlob(b.detach().cpu().numpy().copy()) for b in bottoms]
        if layer._replay is None:
            tops = layer._run_forward(bottom)
            ctx.top_data = [t.data.copy() for t in layer.top]
        else:  # Caffe's Backward without a Forward: the tops as they are stored
            tops = [t.detach().cpu().clone() for t in layer._replay]
            ctx.top_data = [t.numpy() for t in tops]
        ctx.layer, ctx.bottom = layer, bottom
        ctx.like, ctx.n_params = inputs[0], len(inputs) - n_bottoms
        return tuple(tops)

    @staticmethod
    def backward(ctx, *grads):
        like = ctx.like
        top = [PyBlob(data, np.zeros_like(data) if g is None else g.detach().cpu().numpy().astype(data.dtype))
               for data, g in zip(ctx.top_data, grads)]
        for b in ctx.bottom:
            b.diff = np.zeros_like(b.data)
        down = list(ctx.needs_input_grad[2:2 + len(ctx.bottom)])
        ctx.layer.py.backward(top, down, ctx.bottom)
        out = [torch.as_tensor(np.asarray(b.diff).reshape(b.data.shape), dtype=like.dtype, device=like.device)
               if d else None for b, d in zip(ctx.bottom, down)]
        return (None, None, *out, *[None] * ctx.n_params)


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
        object.__setattr__(py, "blobs", ParamViews(self))
        self.top = [PyBlob() for _ in param.top]
        self._replay = None  # the stored tops, while the net records a graph for a backward (replaying)
        self.register_buffer("_marker", torch.empty(0), persistent=False)
        bottom = [PyBlob(np.zeros(s, np.float32)) for s in bottom_shapes]
        py.setup(bottom, self.top)
        py.reshape(bottom, self.top)

    def top_shapes(self, bottom_shapes):
        bottom = [PyBlob(np.zeros(s, np.float32)) for s in bottom_shapes]
        self.py.reshape(bottom, self.top)
        return [tuple(t.data.shape) for t in self.top]

    @contextlib.contextmanager
    def replaying(self, tops):
        """Inside this block a forward that records a graph returns `tops` without running the user's
        forward, so that a backward with no forward before it runs only the user's backward, as Caffe's."""
        self._replay = tops
        try:
            yield
        finally:
            self._replay = None

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
        params = [p for p in self.blobs if p.requires_grad]
        if not bottoms or not torch.is_grad_enabled() or not any(b.requires_grad for b in [*bottoms, *params]):
            device = bottoms[0].device if bottoms else self._marker.device
            tops = self._run_forward([PyBlob(b.detach().cpu().numpy().copy()) for b in bottoms])
            tops = [t.to(device) for t in tops]
        else:
            tops = [t.to(bottoms[0].device) for t in _PythonFunction.apply(self, len(bottoms), *bottoms, *params)]
        return tops[0] if len(tops) == 1 else tuple(tops)
