"""Caffe's solvers (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam), learning-rate policies,
snapshots (.caffemodel + .solverstate, or HDF5) and the training loop of `caffe train`.

The update rules follow the segaware fork's sgd_solver.cpp and solvers/*.cpp, not torch.optim:
gradients are clipped on their global L2 norm, then divided by iter_size, regularised, turned
into an update with the local rate (rate x lr_mult) folded in before momentum, and subtracted.
"""
import logging
import math
import os
import signal
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist

from caffe_layers.engine.net import Net, one_thread_if_tiny
from caffe_layers.errors import PrototxtError, SolverStateError, atomic_path, check_readable_file, write_atomic
from caffe_layers.formats.proto import check_blob_shape, pb
from caffe_layers.formats.prototxt import read_net, read_solver

log = logging.getLogger("caffe_layers.training.solver")

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
_LEGACY_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def _pow(base, exponent):
    """C's pow() on doubles: overflow gives inf, a negative base to a fractional power nan."""
    try:
        return math.pow(base, exponent)  # the same C function; it raises where C returns inf or nan
    except (OverflowError, ValueError):
        with np.errstate(all="ignore"):
            return float(np.power(np.float64(base), np.float64(exponent)))


def _exp(x):
    """C's exp() on a double: overflow gives inf."""
    with np.errstate(all="ignore"):
        return float(np.exp(np.float64(x)))


_FLT_MAX = float(np.finfo(np.float32).max)


def _f32(x):
    """A double rounded to float, as C++ does (out-of-range values become inf)."""
    if abs(x) <= _FLT_MAX:  # no overflow warning to silence (np.errstate costs microseconds)
        return float(np.float32(x))
    with np.errstate(all="ignore"):
        return float(np.float32(x))


def learning_rate(param, it, current_step):
    """(rate, current_step) of Caffe's SGDSolver::GetLearningRate at iteration `it`, computed as the
    C++ does: float settings, double pow/exp, so overflow gives inf or 0 and never an exception."""
    policy = param.lr_policy
    base = param.base_lr
    if policy == "fixed":
        rate = base
    elif policy == "step":
        if param.stepsize <= 0:  # Caffe divides by zero
            raise PrototxtError("solver: lr_policy 'step' needs stepsize > 0")
        current_step = math.trunc(it / param.stepsize)  # C++ integer division truncates
        rate = base * _pow(param.gamma, current_step)
    elif policy == "exp":
        rate = base * _pow(param.gamma, it)
    elif policy == "inv":
        rate = base * _pow(_f32(1.0 + _f32(param.gamma * _f32(it))), -param.power)
    elif policy == "multistep":
        # Quirk: at most one step is taken per call, so two stepvalues passed in one
        # iteration (e.g. after a resume) take effect on consecutive iterations.
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        rate = base * _pow(param.gamma, current_step)
    elif policy == "poly":
        with np.errstate(all="ignore"):  # max_iter 0: inf or nan, as in C++
            frac = float(np.float32(it) / np.float32(param.max_iter))
        rate = base * _pow(_f32(1.0 - frac), param.power)
    elif policy == "sigmoid":
        with np.errstate(all="ignore"):
            rate = base * (1.0 / (1.0 + _exp(-param.gamma * _f32(_f32(it) - _f32(param.stepsize)))))
    else:
        raise PrototxtError(f"solver: unknown lr_policy {policy!r}; expected fixed, step, exp, inv, "
                            f"multistep, poly or sigmoid")
    return _f32(rate), current_step  # Caffe computes the rate as a float


def solver_type(param):
    if param.HasField("solver_type") and not param.HasField("type"):
        return _LEGACY_TYPES[int(param.solver_type)]
    name = param.type or "SGD"
    if name not in SOLVER_TYPES:
        raise ValueError(f"solver: unknown type {name!r}; expected one of {', '.join(SOLVER_TYPES)}")
    return name


class Solver:
    """A Caffe solver over a train net (and its test nets).

    `param`: a SolverParameter, or a solver.prototxt path/text (with `variables` for ${NAME}).
    `resume_data`: "restart" (Caffe: a resumed run reads its data from the start again) or "skip"
    (data layers are advanced past the batches the interrupted run had used, so a resumed run
    equals the uninterrupted one).
    """

    def __init__(self, param, variables=None, resume_data="restart", device=None):
        if not isinstance(param, pb.SolverParameter):
            param = read_solver(param, variables)
        self.param = param
        self.variables = variables
        self.type = solver_type(param)
        if param.average_loss < 1:
            raise ValueError("solver: average_loss must be >= 1")
        if resume_data not in ("restart", "skip"):
            raise ValueError(f"solver: resume_data must be 'restart' or 'skip', got {resume_data!r}")
        self.resume_data = resume_data
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        if param.snapshot and not param.HasField("snapshot_prefix"):
            raise ValueError("solver: snapshot is set but snapshot_prefix is not")
        if param.random_seed >= 0:
            # Caffe seeds only the root solver; every rank gets the same seed here so that
            # fillers give identical initial weights.
            torch.manual_seed(param.random_seed)
            np.random.seed(param.random_seed)
        self.net = self._train_net()
        if device is not None:
            self.net.to(device)
        self.test_nets = self._test_nets() if self.rank == 0 else []
        for net in self.test_nets:
            net.to(self.net.device)
        self.params = [p for p, _, _ in self.net.param_specs]
        self.lr_mults = [lr for _, lr, _ in self.net.param_specs]
        self.decay_mults = [d for _, _, d in self.net.param_specs]
        self._lr_groups, self._decay_groups = _groups(self.lr_mults), _groups(self.decay_mults)
        n_hist = 2 if self.type in ("AdaDelta", "Adam") else 1  # AdaDelta/Adam keep a second set
        self.history = [torch.zeros_like(p.detach()) for _ in range(n_hist) for p in self.params]
        self.iter = 0
        self.current_step = 0
        self.losses, self.smoothed_loss = [], 0.0
        self.requested_early_exit = False
        self.action = lambda: None  # returns None, "snapshot" or "stop" (signals)
        self.callbacks = []  # called as fn(solver, loss) after each iteration
        self.on_start, self.on_gradients = [], []  # pycaffe's add_callback: fn() before forward, before update
        for layer in self.net.layer_modules:
            if hasattr(layer, "set_shard"):
                layer.set_shard(self.rank, self.world)

    def to(self, device):
        """Move the train and test nets and the history blobs to `device`."""
        for net in [self.net] + list(self.test_nets):
            net.to(device)
        self.history = [h.to(device) for h in self.history]

    # ---- nets ----------------------------------------------------------------------------
    @staticmethod
    def _state(phase, net_param, extra):
        state = pb.NetState(phase=phase)
        state.MergeFrom(net_param.state)
        if extra is not None:
            state.MergeFrom(extra)
        return state

    def _make_net(self, net_param, state):
        return Net(net_param, phase=state.phase, level=state.level, stages=list(state.stage))

    def _train_net(self):
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(fields) != 1:
            raise ValueError("solver: give exactly one of net, net_param, train_net, train_net_param "
                             f"(found {fields or 'none'})")
        net_param = read_net(getattr(p, fields[0]), self.variables)
        state = self._state(pb.TRAIN, net_param, self.param.train_state)
        return self._make_net(net_param, state)

    def _test_nets(self):
        p = self.param
        sources = [read_net(n, self.variables) for n in p.test_net_param]
        sources += [read_net(n, self.variables) for n in p.test_net]
        if len(p.test_iter) < len(sources):
            raise ValueError("solver: test_iter must be given for each test net")
        generic = None
        if p.HasField("net_param"):
            generic = p.net_param
        elif p.HasField("net"):
            generic = read_net(p.net, self.variables)
        if generic is None and len(p.test_iter) != len(sources):
            raise ValueError("solver: test_iter must be given for each test net")
        sources += [generic] * (len(p.test_iter) - len(sources))
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise ValueError("solver: test_state must be unset or given once per test net")
        if sources and p.test_interval <= 0:
            raise ValueError("solver: test nets need test_interval > 0")
        nets = []
        for i, src in enumerate(sources):
            state = self._state(pb.TEST, src, p.test_state[i] if len(p.test_state) else None)
            nets.append(self._make_net(src, state))
        return nets

    # ---- one iteration -------------------------------------------------------------------
    def forward_backward(self):
        net = self.net
        if net.explicit_passes() is not None:  # Caffe's own passes over the persistent blobs (engine/explicit.py)
            passes = net.explicit_forward()
            passes.backward(0, len(net.steps) - 1)
            self.last_values = passes.values
            loss = net.loss(passes.loss_values)
            return 0.0 if loss is None else loss.item()
        values = net.run({})
        loss = self.net.loss(values)
        if loss is not None and loss.requires_grad:
            loss.backward()
        self.last_values = values
        return 0.0 if loss is None else loss.item()

    def step(self, iters):
        with one_thread_if_tiny(self.net):  # (a tiny net: Caffe's one thread; engine/net.py)
            self._step(iters)

    def _step(self, iters):
        start_iter, stop_iter = self.iter, self.iter + iters
        self.losses, self.smoothed_loss = [], 0.0
        p = self.param
        while self.iter < stop_iter:
            grads = [q.grad for q in self.params if q.grad is not None]
            if grads:  # zeroed in place: pycaffe's param diff views stay valid
                torch._foreach_zero_(grads)
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization) and self.rank == 0):
                self.test_all()
                if self.requested_early_exit:
                    break
            for fn in self.on_start:
                fn()
            display = p.display and self.iter % p.display == 0
            loss = 0.0
            for _ in range(p.iter_size):
                loss += self.forward_backward()
            loss /= p.iter_size
            self._update_smoothed_loss(loss, start_iter)
            if display and self.rank == 0:
                log.info("Iteration %d, loss = %.6g", self.iter, self.smoothed_loss)
                self._log_outputs()
            for fn in self.on_gradients:
                fn()
            self._all_reduce_grads()
            self.apply_update(display)
            self.iter += 1
            for cb in self.callbacks:
                cb(self, loss)
            if self.iter == stop_iter or self.requested_early_exit:
                self.net.store_values(self.last_values)  # pycaffe: the blobs hold the last iteration's values
            request = self._request()
            if (p.snapshot and self.iter % p.snapshot == 0 and self.rank == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break

    def _request(self):
        request = self.action()
        if self.world > 1:  # every rank must act on a signal that reached any of them
            codes = {None: 0, "snapshot": 1, "stop": 2}
            t = torch.tensor([codes[request]], device=self.net.device)  # NCCL reduces device tensors only
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            request = {0: None, 1: "snapshot", 2: "stop"}[int(t)]
        return request

    def _log_outputs(self):
        index = 0
        weights = self.net.top_loss_weights
        for name in self.net.outputs:
            value = self.last_values.get(name)
            if value is None:
                continue
            w = weights.get(name, 0.0)
            for v in value.detach().reshape(-1).cpu().tolist():
                log.info("    Train net output #%d: %s = %.6g%s", index, name, v, loss_suffix(w, v))
                index += 1

    def _update_smoothed_loss(self, loss, start_iter):
        n = self.param.average_loss
        if len(self.losses) < n:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - start_iter) % n
            self.smoothed_loss += (loss - self.losses[idx]) / n
            self.losses[idx] = loss

    def _all_reduce_grads(self):
        if self.world == 1:
            return
        # As Caffe's multi-GPU sync: sum the gradients of all solvers, then divide by their number.
        flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                          for q in self.params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for q in self.params:
            q.grad = flat[offset:offset + q.numel()].view_as(q).clone()
            offset += q.numel()

    # ---- the update rules ----------------------------------------------------------------
    def apply_update(self, display=False):
        """SGDSolver::ApplyUpdate over all parameters at once (torch._foreach_*): as in Caffe, each
        parameter's diff is clipped, normalised, regularised and turned into the update value in place
        (so pycaffe's param diffs show the update afterwards), then subtracted from the data."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        if display and self.rank == 0:
            log.info("Iteration %d, lr = %.6g", self.iter, rate)
        with torch.no_grad():
            diffs = self._param_diffs()
            self._clip(diffs)
            if self.param.iter_size != 1:  # Normalize: after clipping, as in Caffe
                torch._foreach_mul_(diffs, 1.0 / self.param.iter_size)
            self._regularize(diffs)
            for lr_mult, idx in self._lr_groups:
                # the float product of two floats: their (exact) double product rounded to float
                local_rate = rate if lr_mult == 1 else _f32(rate * lr_mult)
                self._update_value(idx, [diffs[i] for i in idx], local_rate)
            torch._foreach_sub_(self.params, diffs)

    def _param_diffs(self):
        """The parameters' gradients (Caffe's diffs), zeros for any that received none."""
        for q in self.params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        return [q.grad for q in self.params]

    def _clip(self, diffs):
        clip = self.param.clip_gradients
        if clip < 0:
            return
        # Quirk: the norm is taken before the iter_size normalisation (as in the original).
        sumsq = sum(float(torch.sum(d.double() * d.double())) for d in diffs)
        norm = math.sqrt(sumsq)
        if norm > clip:
            factor = clip / norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                     norm, clip, factor)
            torch._foreach_mul_(diffs, factor)

    def _regularize(self, diffs):
        kind = self.param.regularization_type
        for decay_mult, idx in self._decay_groups:
            decay = self.param.weight_decay * decay_mult
            if not decay:
                continue
            if kind not in ("L1", "L2"):
                raise ValueError(f"solver: unknown regularization_type {kind!r}; expected L1 or L2")
            data = [self.params[i] for i in idx]  # (under no_grad: no graph)
            torch._foreach_add_([diffs[i] for i in idx], torch._foreach_sign(data) if kind == "L1" else data,
                                alpha=decay)

    def _update_value(self, idx, g, local_rate):
        """ComputeUpdateValue for the parameters `idx` (one lr_mult): their diffs `g` become the update."""
        p = self.param
        h = [self.history[i] for i in idx]
        if self.type == "SGD":
            torch._foreach_mul_(h, p.momentum)
            torch._foreach_add_(h, g, alpha=local_rate)
            torch._foreach_copy_(g, h)
            return
        if self.type == "Nesterov":
            previous = torch._foreach_mul(h, p.momentum)
            torch._foreach_mul_(h, p.momentum)
            torch._foreach_add_(h, g, alpha=local_rate)
            update = torch._foreach_mul(h, 1.0 + p.momentum)
            torch._foreach_sub_(update, previous)
        elif self.type in ("AdaGrad", "RMSProp"):
            if self.type == "AdaGrad":
                torch._foreach_add_(h, torch._foreach_mul(g, g))
            else:
                torch._foreach_mul_(h, p.rms_decay)
                torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=1.0 - p.rms_decay)
            denominator = torch._foreach_sqrt(h)
            torch._foreach_add_(denominator, p.delta)
            update = torch._foreach_mul(g, local_rate)
            torch._foreach_div_(update, denominator)
        elif self.type == "AdaDelta":
            u = [self.history[len(self.params) + i] for i in idx]
            torch._foreach_mul_(h, p.momentum)
            torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=1.0 - p.momentum)
            ratio = torch._foreach_add(u, p.delta)
            torch._foreach_div_(ratio, torch._foreach_add(h, p.delta))
            torch._foreach_sqrt_(ratio)
            update = torch._foreach_mul(g, ratio)
            torch._foreach_mul_(u, p.momentum)
            torch._foreach_add_(u, torch._foreach_mul(update, update), alpha=1.0 - p.momentum)
            torch._foreach_mul_(update, local_rate)
        elif self.type == "Adam":
            m, v = h, [self.history[len(self.params) + i] for i in idx]
            b1, b2 = p.momentum, p.momentum2
            t = self.iter + 1
            with np.errstate(all="ignore"):  # C++ arithmetic: nan or inf, never an exception
                correction = _f32(np.sqrt(np.float64(1.0 - _pow(b2, t))) / np.float64(1.0 - _pow(b1, t)))
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, g, alpha=1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_add_(v, torch._foreach_mul(g, g), alpha=1.0 - b2)
            denominator = torch._foreach_sqrt(v)
            torch._foreach_add_(denominator, p.delta)
            update = torch._foreach_div(m, denominator)
            torch._foreach_mul_(update, local_rate * correction)
        else:
            raise AssertionError(self.type)
        torch._foreach_copy_(g, update)

    # ---- solving -------------------------------------------------------------------------
    def solve(self, resume_file=None):
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", self.param.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0) and self.rank == 0:
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        # Caffe's final display runs one more forward pass (it consumes a batch).
        if p.display and self.iter % p.display == 0:
            values = _forward(self.net)
            loss = self.net.loss(values)
            self._update_smoothed_loss(0.0 if loss is None else float(loss), 0)
            if self.rank == 0:
                log.info("Iteration %d, loss = %.6g", self.iter, self.smoothed_loss)
        if p.test_interval and self.iter % p.test_interval == 0 and self.rank == 0:
            self.test_all()
        log.info("Optimization Done.")

    def test_all(self):
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, i):
        """Run test net i for test_iter[i] batches; returns {output: mean value}."""
        net = self.test_nets[i]
        log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        share_trained_layers(net, self.net)
        scores, total_loss = {}, 0.0
        n = self.param.test_iter[i]
        compute_loss = self.param.test_compute_loss
        outputs = net.outputs
        for _ in range(n):
            request = self.action()
            while request is not None:
                if request == "snapshot":
                    self.snapshot()
                elif request == "stop":
                    self.requested_early_exit = True
                request = self.action()
            if self.requested_early_exit:
                log.info("Test interrupted.")
                return None
            values = _forward(net)
            loss = net.loss(values) if compute_loss else None
            if loss is not None:
                total_loss += loss.item()
            for name in outputs:
                v = values[name]
                # summed in double, as Python floats where the output is one number (most are)
                v = v.item() if v.numel() == 1 else v.detach().double().reshape(-1).cpu()
                scores[name] = scores[name] + v if name in scores else v
        if self.param.test_compute_loss:
            log.info("Test loss: %g", total_loss / n)
        weights = net.top_loss_weights
        means, index = {}, 0
        for name, total in scores.items():
            mean = torch.as_tensor(total, dtype=torch.float64).reshape(-1) / n
            means[name] = mean.numpy()
            w = weights.get(name, 0.0)
            for v in mean.tolist():
                log.info("    Test net output #%d: %s = %.6g%s", index, name, v, loss_suffix(w, v))
                index += 1
        return means

    # ---- snapshots -----------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Write <prefix>_iter_N.caffemodel(.h5) and .solverstate(.h5); returns both paths."""
        from caffe_layers.formats.weights import save_weights

        hdf5 = self.param.snapshot_format == pb.SolverParameter.HDF5
        model = self.snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        log.info("Snapshotting to %s file %s", "HDF5" if hdf5 else "binary proto", model)
        save_weights(self.net, model)
        state = self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting solver state to %s file %s", "HDF5" if hdf5 else "binary proto", state)
        if hdf5:
            with atomic_path(state) as tmp, h5py.File(tmp, "w") as f:
                f["iter"] = np.int32(self.iter)
                f["learned_net"] = np.bytes_(model)
                f["current_step"] = np.int32(self.current_step)
                group = f.create_group("history")
                for i, h in enumerate(self.history):
                    group[str(i)] = h.detach().cpu().float().numpy()
        else:
            msg = pb.SolverState(iter=self.iter, learned_net=model, current_step=self.current_step)
            for h in self.history:
                blob = msg.history.add()
                blob.shape.dim.extend(h.shape)
                blob.data.extend(h.detach().cpu().float().reshape(-1).tolist())
            write_atomic(state, msg.SerializeToString())
        return model, state

    def restore(self, state_file):
        """Continue from a .solverstate(.h5): iteration, step, history and the learned net."""
        from caffe_layers.formats.weights import load_weights

        state_file = check_readable_file(state_file, "solver state")
        if state_file.endswith(".h5"):
            it, learned, step, history = read_solverstate_hdf5(state_file, self._history_shapes())
        else:
            it, learned, step, history = read_solverstate(state_file)
        if len(history) != len(self.history):
            raise SolverStateError(f"{state_file}: {len(history)} history blobs, but this {self.type} "
                                   f"solver over this net has {len(self.history)}")
        for i, (h, values) in enumerate(zip(self.history, history)):
            if values.size != h.numel():
                raise SolverStateError(f"{state_file}: history blob {i} has {values.size} values, "
                                       f"expected {h.numel()} (shape {list(h.shape)})")
        if learned:
            moved = os.path.join(os.path.dirname(state_file), learned)
            if not os.path.exists(learned) and os.path.exists(moved):
                learned = moved  # snapshot moved together with its model
            if not os.path.isfile(learned):
                raise SolverStateError(f"{state_file}: its learned_net {learned!r} is not found")
            load_weights(self.net, learned)
        with torch.no_grad():
            for h, values in zip(self.history, history):
                h.copy_(torch.as_tensor(values.reshape(h.shape), dtype=h.dtype))
        self.iter, self.current_step = it, step
        if self.resume_data == "skip":
            self.skip_batches(it * self.param.iter_size)

    def _history_shapes(self):
        return [tuple(h.shape) for h in self.history]

    def skip_batches(self, n):
        """Advance every data layer of the train net by n batches (read and dropped, not turned into tensors)."""
        for layer in self.net.layer_modules:
            if getattr(layer, "is_data_layer", False):
                for _ in range(n):
                    layer.next_batch()


def _forward(net):
    """A forward pass without a graph: {blob: value}. Where the net allows explicit passes, into its blobs (as
    Caffe's test and display passes leave them); else net.run (the blobs stay as they were)."""
    if net.explicit_passes() is not None:
        return net.explicit_forward().values
    with torch.no_grad():
        return net.run({})


def _groups(values):
    """[(value, [indices])] of the distinct values in a list, in order of first appearance."""
    groups = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    return list(groups.items())


def share_trained_layers(target, source):
    """Caffe's Net::ShareTrainedLayersWith: each layer of `target` named as a layer of `source` reads
    that layer's parameter data (the same storage, so later updates show; diffs stay apart)."""
    by_name = {}
    for layer in target.layer_modules:
        by_name.setdefault(layer.name, layer)
    for src in source.layer_modules:
        dst = by_name.get(src.name)
        if dst is None:
            continue
        if len(dst.blobs) != len(src.blobs):
            raise ValueError(f"cannot share layer {src.name!r}: incompatible number of blobs "
                             f"({len(src.blobs)} in the source net, {len(dst.blobs)} in the target)")
        for j, (s, d) in enumerate(zip(src.blobs, dst.blobs)):
            if s.shape != d.shape:
                raise ValueError(f"cannot share param {j} weights from layer {src.name!r}; shape mismatch: "
                                 f"source param shape is {list(s.shape)}; target param shape is {list(d.shape)}")
            if d.data_ptr() != s.data_ptr():
                d.data = s.data


def loss_suffix(weight, value):
    """Caffe's " (* weight = weighted loss)" after a net output with a loss weight; "" without one.
    (For floats "g" is ".6g", as the solver's output lines have it.)"""
    return f" (* {weight:g} = {weight * value:g} loss)" if weight else ""


def blob_array(blob, source="?", error=SolverStateError):
    """The values of a BlobProto as a float array of its shape (legacy 4-D fields too)."""
    if blob.HasField("shape"):
        shape = tuple(blob.shape.dim)
    elif any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = (len(blob.data) or len(blob.double_data),)
    check_blob_shape(shape, source, error)
    values = np.asarray(blob.double_data if len(blob.double_data) else blob.data, dtype=np.float32)
    if values.size != math.prod(shape):
        raise error(f"{source}: BlobProto with shape {list(shape)} holds {values.size} values")
    return values.reshape(shape)


def read_solverstate(path):
    """(iter, learned_net, current_step, [history arrays]) of a binary .solverstate. Caffe's
    snapshot writes every field, so a missing iter or current_step means a file cut short."""
    msg = pb.SolverState()
    try:
        msg.ParseFromString(Path(path).read_bytes())
    except OSError as err:
        raise SolverStateError(f"{path}: cannot read the solver state: {err.strerror or err}") from err
    except Exception as err:  # protobuf's DecodeError, or a UnicodeDecodeError in a string field
        raise SolverStateError(f"{path}: not a SolverState binary proto ({err})") from err
    for name in ("iter", "current_step"):
        if not msg.HasField(name):
            raise SolverStateError(f"{path}: SolverState without {name} (Caffe always writes it: "
                                   f"the file is truncated or not a solver state)")
    if not isinstance(msg.learned_net, str):  # protobuf gives bytes for invalid UTF-8
        raise SolverStateError(f"{path}: learned_net is not a UTF-8 path")
    history = [blob_array(b, f"{path}: history blob {i}") for i, b in enumerate(msg.history)]
    return msg.iter, msg.learned_net, msg.current_step, history


def read_solverstate_hdf5(path, expected_shapes=None):
    """(iter, learned_net, current_step, [history arrays]) of a .solverstate.h5; with
    `expected_shapes`, each history dataset's size is checked before it is read."""
    from caffe_layers.formats.weights import reading_hdf5

    with reading_hdf5(path, SolverStateError, "the HDF5 solver state") as f:
        return _solverstate_fields(f, path, expected_shapes)


def _solverstate_fields(f, path, expected_shapes):
    def dataset(name, kinds):
        d = f.get(name)
        if not isinstance(d, h5py.Dataset) or d.shape != () or d.dtype.kind not in kinds:
            raise SolverStateError(f"{path}: /{name} must be a scalar dataset "
                                   f"({'integer' if kinds == 'iu' else 'string'})")
        return d[()]

    it = int(dataset("iter", "iu"))
    step = int(dataset("current_step", "iu"))
    learned = dataset("learned_net", "SOU") if "learned_net" in f else b""
    if isinstance(learned, bytes):
        try:
            learned = learned.decode()
        except UnicodeDecodeError as err:
            raise SolverStateError(f"{path}: /learned_net is not a UTF-8 path") from err
    group = f.get("history")
    if not isinstance(group, h5py.Group):
        raise SolverStateError(f"{path}: no /history group")
    if sorted(group.keys(), key=lambda k: (len(k), k)) != [str(i) for i in range(len(group))]:
        raise SolverStateError(f"{path}: /history holds {sorted(group.keys())}, expected 0..{len(group) - 1}")
    history = []
    for i in range(len(group)):
        d = group.get(str(i))
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in "fiu":
            raise SolverStateError(f"{path}: /history/{i} must be a numeric dataset")
        if expected_shapes is not None and i < len(expected_shapes):
            if d.size != math.prod(expected_shapes[i]):
                raise SolverStateError(f"{path}: history blob {i} has {d.size} values, expected "
                                       f"{math.prod(expected_shapes[i])} (shape {list(expected_shapes[i])})")
        values = np.asarray(d[()])
        history.append(values.astype(values.dtype.newbyteorder("="), copy=False))  # big-endian too
    return it, learned, step, history


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SignalActions:
    """Caffe's SignalHandler: SIGINT and SIGHUP become solver actions ("stop", "snapshot", None)."""

    def __init__(self, sigint="stop", sighup="snapshot"):
        effects = {"stop": "stop", "snapshot": "snapshot", "none": None}
        for name, value in (("sigint_effect", sigint), ("sighup_effect", sighup)):
            if value not in effects:
                raise ValueError(f"{name} must be stop, snapshot or none, got {value!r}")
        self.effects = {signal.SIGINT: effects[sigint], signal.SIGHUP: effects[sighup]}
        self.pending = []
        self.previous = {}

    def __enter__(self):
        for sig in self.effects:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.pending.append(signum)

    def __call__(self):
        while self.pending:
            effect = self.effects[self.pending.pop(0)]
            if effect is not None:
                return effect
        return None
