"""Caffe's Net::Forward and Net::Backward for the pycaffe Net without autograd, where every layer allows it.

A layer takes part with `caffe_forward(bottoms, tops)`, which writes its tops' persistent tensors, and, where
Caffe backpropagates through it, `caffe_backward(tops, top_diffs, bottoms, propagate_down)`, Caffe's
Backward_cpu: it adds its parameter diffs into each blob's .grad and returns one bottom diff (or None) per
bottom. The pass then runs a few torch calls a layer on tensors fixed once (small nets: no autograd graph, no
per-call shape work); autograd stays the general path (engine/net.py) and the reference in the tests.
"""
import torch

from caffe_layers.errors import TopReshaped


def supports(net):
    """Whether `net` (a pycaffe Net) can run explicit passes: every layer has caffe_forward, every layer
    Caffe backpropagates through caffe_backward; no fused chain, no layer writing a blob in place, no shared
    parameter blobs, no module hooks (they would not run), and blobs where the layers run."""
    if net.fused_steps is not None:
        return False
    for index, step in enumerate(net.steps):
        layer = step.layer
        if step.is_input:
            if net.device.type != "cpu":  # inputs stay on the CPU for pycaffe scripts
                return False
            continue
        if (getattr(layer, "caffe_forward", None) is None or layer.shared_blobs
                or any(t in step.bottoms for t in step.tops)
                or layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks):
            return False
        if net._need_backward[index] and getattr(layer, "caffe_backward", None) is None:
            return False
    return True


class ExplicitPasses:
    """The explicit forward and backward passes of one pycaffe Net over its current blob storage (the net
    drops this object whenever that storage changes). It holds no reference to the net."""

    def __init__(self, net):
        self.forwards = []  # per step: (caffe_forward, bottoms, tops) or None (an Input layer)
        self.backwards = []  # per step: None or (caffe_backward, tops, top diffs, bottoms, downs, [(bottom, diff)])
        self.values = {}  # blob name -> its data tensor
        for name in net.blob_shapes:
            if not net._blob_data(name).is_contiguous():  # (an adopted value; tops are written through views)
                net._data[name] = net._data[name].contiguous()
        for index, step in enumerate(net.steps):
            bottoms = [net._blob_data(b) for b in step.bottoms]
            tops = [net._blob_data(t) for t in step.tops]
            self.values.update(zip(step.tops, tops))
            self.forwards.append(None if step.is_input else (step.layer.caffe_forward, bottoms, tops))
            if not net._need_backward[index]:
                self.backwards.append(None)
                continue
            downs = list(net._bottom_needs[index])
            targets = [(name, net._blob_diff(name)) for name in step.bottoms]
            self.backwards.append((step.layer.caffe_backward, tops, [net._blob_diff(t) for t in step.tops],
                                   bottoms, downs, targets))
        self.loss_values = {name: self.values[name] for name, weight in net._top_weights() if weight}

    def forward(self, first, last):
        """Steps first..last-1; a data layer whose batch changed shape raises TopReshaped with its index."""
        with torch.no_grad():
            for index in range(first, last):
                entry = self.forwards[index]
                if entry is not None:
                    try:
                        entry[0](entry[1], entry[2])
                    except TopReshaped as new:
                        new.index = index
                        raise

    def backward(self, lo, hi):
        """Steps hi down to lo: each writes its bottoms' diffs (a blob several layers read gets the sum, as
        Caffe's Split layers give) and adds into its parameter diffs."""
        written = set()
        with torch.no_grad():
            for index in range(hi, lo - 1, -1):
                entry = self.backwards[index]
                if entry is None:
                    continue
                backward, tops, top_diffs, bottoms, downs, targets = entry
                diffs = backward(tops, top_diffs, bottoms, downs)
                for (name, target), diff in zip(targets, diffs):
                    if diff is None:
                        continue
                    if name in written:  # (no layer here writes in place)
                        target.add_(diff)
                    else:
                        target.copy_(diff)
                        written.add(name)
