"""pycaffe's python/caffe/pycaffe.py: Net, the six solver classes, NCCL and Timer, and the batch helpers
pycaffe attaches to Net (forward_all, forward_backward_all).

The solvers are thin pycaffe-style faces over caffe_layers.training.solver.Solver: `SGDSolver(path)` runs
the file's net with SGD whatever its `type` says (as pycaffe's constructors do); `get_solver(path)` picks
the class from the file.
"""
import time
from itertools import zip_longest

import numpy as np

from caffe_layers.engine.net import Net
from caffe_layers.pycaffe import mode
from caffe_layers.formats.proto import pb
from caffe_layers.formats.prototxt import read_solver
from caffe_layers.training.solver import Solver as _Solver, share_trained_layers, solver_type


class Solver:
    """pycaffe's Solver: net, test_nets, iter, step, solve, restore, snapshot, apply_update,
    share_weights, add_callback, param."""

    solver_type = None  # set by each subclass

    def __init__(self, filename):
        param = filename if isinstance(filename, pb.SolverParameter) else read_solver(filename)
        if self.solver_type is not None:
            param = _with_type(param, self.solver_type)
        self._solver = _Solver(param)
        self._mode_generation = mode.generation()

    def _follow_mode(self):
        """As Net.follow_mode: after a caffe.set_mode_* call the next step or solve runs where the mode says."""
        if self._mode_generation != mode.generation():
            self._mode_generation = mode.generation()
            if self._solver.net.device != mode.device():
                self._solver.to(mode.device())

    @property
    def net(self):
        return self._solver.net

    @property
    def test_nets(self):
        return list(self._solver.test_nets)

    @property
    def iter(self):
        return self._solver.iter

    @property
    def max_iter(self):
        return self._solver.param.max_iter

    @property
    def param(self):
        return self._solver.param

    @property
    def lr(self):
        """The learning rate of the current iteration (SGDSolver::GetLearningRate)."""
        from caffe_layers.training.solver import learning_rate

        return learning_rate(self._solver.param, self._solver.iter, self._solver.current_step)[0]

    def step(self, iters):
        self._follow_mode()
        self._solver.step(int(iters))

    def solve(self, resume_file=None):
        self._follow_mode()
        self._solver.solve(resume_file)

    def restore(self, state_file):
        self._solver.restore(state_file)

    def snapshot(self):
        self._solver.snapshot()

    def apply_update(self):
        self._solver.apply_update()

    def share_weights(self, net):
        """Make `net` use the train net's weights for the layers they share by name."""
        share_trained_layers(net, self._solver.net)

    def close(self):
        """Release the data layers of the train and test nets (ours; dropping the solver does it too)."""
        for net in [self._solver.net] + list(self._solver.test_nets):
            net.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add_callback(self, on_start, on_gradients):
        """on_start() before each iteration's forward/backward, on_gradients() before its update."""
        self._solver.on_start.append(on_start)
        self._solver.on_gradients.append(on_gradients)


def _with_type(param, name):
    out = pb.SolverParameter()
    out.CopyFrom(param)
    out.ClearField("solver_type")
    out.type = name
    return out


class SGDSolver(Solver):
    solver_type = "SGD"


class NesterovSolver(SGDSolver):
    solver_type = "Nesterov"


class AdaGradSolver(SGDSolver):
    solver_type = "AdaGrad"


class RMSPropSolver(SGDSolver):
    solver_type = "RMSProp"


class AdaDeltaSolver(SGDSolver):
    solver_type = "AdaDelta"


class AdamSolver(SGDSolver):
    solver_type = "Adam"


SOLVER_CLASSES = {c.solver_type: c for c in
                  (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def get_solver(filename):
    """The solver the file's `type` (or legacy `solver_type`) names, as caffe.get_solver."""
    param = read_solver(filename)
    return SOLVER_CLASSES[solver_type(param)](param)


class NCCL:
    """pycaffe's NCCL exists only in builds with NCCL; has_nccl() is False here. Data-parallel
    training runs on torch.distributed instead (`caffe-layers train --gpu 0,1`)."""

    def __init__(self, solver, uid):
        raise RuntimeError("caffe.NCCL: this build has no NCCL (caffe.has_nccl() is False); use "
                           "`caffe-layers train --gpu 0,1,...` for data-parallel training")

    @staticmethod
    def new_uid():
        raise RuntimeError("caffe.NCCL.new_uid: this build has no NCCL (caffe.has_nccl() is False)")


class Timer:
    """pycaffe's Timer: start(), stop(), ms (milliseconds between them, or up to now while running)."""

    def __init__(self):
        self._start, self._elapsed, self._running = None, 0.0, False

    def start(self):
        self._start, self._running = time.perf_counter(), True

    def stop(self):
        if self._running:
            self._elapsed = time.perf_counter() - self._start
            self._running = False

    @property
    def ms(self):
        if self._running:
            return (time.perf_counter() - self._start) * 1e3
        return self._elapsed * 1e3


# ---- the batch helpers pycaffe attaches to Net; they use only the pycaffe interface ----------------
def _batch(net, blobs):
    """Split {name: array of N items} into net-batch-sized dicts; the last one is zero-padded."""
    num = len(next(iter(blobs.values())))
    batch_size = next(iter(net.blobs.values())).shape[0]
    full, remainder = divmod(num, batch_size)
    for b in range(full):
        yield {name: value[b * batch_size:(b + 1) * batch_size] for name, value in blobs.items()}
    if remainder:
        yield {name: np.concatenate([value[-remainder:],
                                     np.zeros((batch_size - remainder,) + value.shape[1:])])
               for name, value in blobs.items()}


def _drop_padding(arrays, given):
    pad = len(next(iter(arrays.values()))) - len(next(iter(given.values())))
    return {k: v[:-pad] for k, v in arrays.items()} if pad else arrays


def forward_all(net, blobs=None, **kwargs):
    """Run net.forward over the inputs in batches: {blob: array of all items} (outputs and `blobs`)."""
    outs = {name: [] for name in set(net.outputs + (blobs or []))}
    for batch in _batch(net, kwargs):
        for name, value in net.forward(blobs=blobs, **batch).items():
            outs[name].extend(value.copy())
    return _drop_padding({k: np.asarray(v) for k, v in outs.items()}, kwargs)


def forward_backward_all(net, blobs=None, diffs=None, **kwargs):
    """forward then backward in batches: ({blob: data}, {blob: diff}) over all items."""
    outs = {name: [] for name in set(net.outputs + (blobs or []))}
    grads = {name: [] for name in set(net.inputs + (diffs or []))}
    forward_batches = _batch(net, {k: kwargs[k] for k in net.inputs if k in kwargs})
    backward_batches = _batch(net, {k: kwargs[k] for k in net.outputs if k in kwargs})
    for fb, bb in zip_longest(forward_batches, backward_batches, fillvalue={}):
        for name, value in net.forward(blobs=blobs, **fb).items():
            outs[name].extend(value.copy())
        for name, value in net.backward(diffs=diffs, **bb).items():
            grads[name].extend(value.copy())
    outs = _drop_padding({k: np.asarray(v) for k, v in outs.items()}, kwargs)
    grads = _drop_padding({k: np.asarray(v) for k, v in grads.items()}, kwargs)
    return outs, grads


for _name, _helper in (("forward_all", forward_all), ("forward_backward_all", forward_backward_all),
                       ("_batch", _batch)):
    if not hasattr(Net, _name):  # as pycaffe.py attaches them; a Net that has its own keeps it
        setattr(Net, _name, _helper)
