"""Accuracy: top_k classification accuracy over `axis`, skipping ignore_label; top 2 is per class."""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, canonical_axis, count, optional


def labels_as_int(label):
    """Caffe reads labels with static_cast<int>: truncation toward zero."""
    return label.to(torch.int64)  # (integer tensors never carry a gradient: no detach needed)


def check_label_count(name, scores, label, axis):
    """Reshape-time check of one label per prediction (shapes); returns the canonical class axis."""
    axis = canonical_axis(axis, len(scores), name)
    outer, inner = count(scores, 0, axis), count(scores, axis + 1)
    if outer * inner != count(label):
        raise ValueError(f"layer {name!r}: {count(label)} labels for {outer * inner} predictions "
                         f"(scores {list(scores)}, axis {axis}); expected one label per prediction")
    return axis


def labels_per_prediction(scores, label, axis, ignore_label, name):
    """Scores as (outer, classes, inner), the labels as int (outer, 1, inner) and where they are valid
    (not the ignore_label; None without an ignore_label: all are); `axis` is the canonical class axis.
    Checks one label per prediction and, except on meta tensors, that every valid label is a class index."""
    outer, classes, inner = count(scores.shape, 0, axis), scores.shape[axis], count(scores.shape, axis + 1)
    if outer * inner != label.numel():
        raise ValueError(f"layer {name!r}: {label.numel()} labels for {outer * inner} predictions "
                         f"(scores {list(scores.shape)}, axis {axis}); expected one label per prediction")
    lab = labels_as_int(label).reshape(outer, 1, inner)
    valid = None if ignore_label is None else lab != ignore_label
    if scores.device.type != "meta" and lab.numel():
        check_labels(lab, valid, classes, name)
    return scores.reshape(outer, classes, inner), lab, valid


def check_labels(lab, valid, classes, name):
    """Every valid label (valid None: all) a class index. Inside torch.compile and torch.export an assertion op
    in the graph (a branch on the labels' values would break it)."""
    message = f"layer {name!r}: labels must lie in [0, {classes}) (or be the ignore_label)"
    if torch.compiler.is_compiling():
        bad = (lab < 0) | (lab >= classes)
        torch._assert_async(~(bad if valid is None else bad & valid).any(), message)
        return
    if valid is None:
        low, high = torch.aminmax(lab)
        bad = low.item() < 0 or high.item() >= classes
    else:
        bad = bool((((lab < 0) | (lab >= classes)) & valid).any())
    if bad:
        raise ValueError(message)


@register("Accuracy")
class Accuracy(Layer):
    exact_bottoms = 2
    min_tops, max_tops = 1, 2

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.accuracy_param
        self.top_k, self.axis = p.top_k, p.axis
        self.ignore_label = optional(p, "ignore_label")
        self.num_tops = len(param.top)

    def top_shapes(self, bottom_shapes):
        scores, label = bottom_shapes
        axis = check_label_count(self.name, scores, label, self.axis)
        if self.top_k > count(scores) // max(count(label), 1):
            raise ValueError(f"layer {self.name!r}: top_k {self.top_k} exceeds the number of classes")
        return [()] if self.num_tops < 2 else [(), (scores[axis],)]

    def forward(self, scores, label):
        scores = scores.detach()  # Caffe's Accuracy has no backward
        axis = canonical_axis(self.axis, scores.dim(), self.name)
        if self.top_k > scores.numel() // max(label.numel(), 1):
            raise ValueError(f"layer {self.name!r}: top_k {self.top_k} exceeds the number of classes")
        s, lab, valid = labels_per_prediction(scores, label, axis, self.ignore_label, self.name)
        classes = s.shape[1]
        safe = lab if valid is None else torch.where(valid, lab, torch.zeros_like(lab))
        mine = s.gather(1, safe)
        # rank of the label in Caffe's (value, index) descending order: ties rank higher indices first
        cls = torch.arange(classes, device=s.device).reshape(1, classes, 1)
        above = (s > mine) | ((s == mine) & (cls > safe))
        hit = above.sum(1, keepdim=True) < self.top_k
        if valid is None:
            acc = hit.sum().to(s.dtype) / float(lab.numel())  # 0/0 = NaN, as in Caffe
        else:
            hit &= valid
            acc = hit.sum().to(s.dtype) / valid.sum().to(s.dtype)
        if self.num_tops < 2:
            return acc.reshape(())
        flat = safe.reshape(-1)
        counted = torch.ones_like(flat, dtype=s.dtype) if valid is None else valid.reshape(-1).to(s.dtype)
        nums = torch.zeros(classes, dtype=s.dtype, device=s.device).index_add_(0, flat, counted)
        hits = torch.zeros(classes, dtype=s.dtype, device=s.device).index_add_(0, flat, hit.reshape(-1).to(s.dtype))
        per_class = torch.where(nums > 0, hits / nums.clamp(min=1), torch.zeros_like(nums))
        return acc.reshape(()), per_class
