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
    if scores.device.type != "meta" and lab.numel() and not (valid is None and _gather_checks(scores)):
        check_labels(lab, valid, classes, name)
    return scores.reshape(outer, classes, inner), lab, valid


def _gather_checks(scores):
    """Whether gather_labels' gather checks the labels itself (eager, on the CPU): no check_labels then."""
    return scores.device.type == "cpu" and not torch.compiler.is_compiling()


def gather_labels(values, lab, name):
    """values.gather(1, lab) (values (outer, classes, inner), the labels of labels_per_prediction, or the safe
    labels where some are ignored); an index out of range is check_labels' error."""
    try:
        return values.gather(1, lab)
    except RuntimeError as err:  # gather's own bounds check (the CPU's), where labels_per_prediction left it
        raise ValueError(_label_message(name, values.shape[1])) from err


def _label_message(name, classes):
    return f"layer {name!r}: labels must lie in [0, {classes}) (or be the ignore_label)"


def check_labels(lab, valid, classes, name):
    """Every valid label (valid None: all) a class index. Inside torch.compile and torch.export an assertion op
    in the graph (a branch on the labels' values would break it)."""
    message = _label_message(name, classes)
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
        if self.top_k > scores.numel() // max(label.numel(), 1):
            raise ValueError(f"layer {self.name!r}: top_k {self.top_k} exceeds the number of classes")
        s, lab, valid = self._labelled(scores, label)
        return self._accuracy(s, lab, valid, torch.arange(s.shape[1], device=s.device).reshape(1, -1, 1))

    def _labelled(self, scores, label):
        axis = canonical_axis(self.axis, scores.dim(), self.name)
        return labels_per_prediction(scores, label, axis, self.ignore_label, self.name)

    def _accuracy(self, s, lab, valid, cls):
        """The tops from scores s (outer, classes, inner), labels_per_prediction's labels and the class indices
        cls (1, classes, 1)."""
        classes = s.shape[1]
        safe = lab if valid is None else torch.where(valid, lab, torch.zeros_like(lab))
        mine = gather_labels(s, safe, self.name)
        # rank of the label in Caffe's (value, index) descending order: ties rank higher indices first
        above = torch.where(cls > safe, s >= mine, s > mine)
        hit = above.sum(1, keepdim=True) < self.top_k
        if valid is None:
            acc = hit.sum(dtype=s.dtype) / float(lab.numel())  # 0/0 = NaN, as in Caffe
        else:
            hit &= valid
            acc = hit.sum(dtype=s.dtype) / valid.sum(dtype=s.dtype)
        if self.num_tops < 2:
            return acc
        flat = safe.reshape(-1)
        counted = torch.ones_like(flat, dtype=s.dtype) if valid is None else valid.reshape(-1).to(s.dtype)
        nums = torch.zeros(classes, dtype=s.dtype, device=s.device).index_add_(0, flat, counted)
        hits = torch.zeros(classes, dtype=s.dtype, device=s.device).index_add_(0, flat, hit.reshape(-1).to(s.dtype))
        per_class = torch.where(nums > 0, hits / nums.clamp(min=1), torch.zeros_like(nums))
        return acc, per_class

    def caffe_forward(self, bottoms, tops):
        """forward's values written into the tops (engine/explicit.py; the shapes are Reshape's, checked)."""
        s, lab, valid = self._labelled(*bottoms)
        cls = getattr(self, "_class_index", None)
        if cls is None or cls.shape[1] != s.shape[1] or cls.device != s.device:
            cls = torch.arange(s.shape[1], device=s.device).reshape(1, -1, 1)
            object.__setattr__(self, "_class_index", cls)  # (kept outside forward: torch.compile traces that)
        values = self._accuracy(s, lab, valid, cls)
        for top, value in zip(tops, (values,) if self.num_tops < 2 else values):
            top.copy_(value)

    def caffe_backward(self, tops, top_diffs, bottoms, propagate_down):
        return None, None  # Caffe's Accuracy has no backward (as forward's detach: no diffs reach the scores)
