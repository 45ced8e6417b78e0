"""SegAccuracy (DeepLab v2, as in segaware): [pixel accuracy, mean class recall, mean IoU] as 1x1x1x3.

From a confusion matrix of (label, argmax) over the non-ignored pixels. The matrix is cleared on each
forward when seg_accuracy_param.reset is true (the default) and accumulates across forwards otherwise.
"""
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, legacy_shape


@register("SegAccuracy")
class SegAccuracy(Layer):
    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        s, l = (legacy_shape(x) for x in self.bottom_shapes)
        if len(self.bottom_shapes[0]) > 4 or len(self.bottom_shapes[1]) > 4:
            raise ValueError(f"layer {self.name!r} (SegAccuracy): needs bottoms of at most 4 axes")
        if s[0] != l[0] or l[1] != 1 or s[2:] != l[2:]:
            raise ValueError(f"layer {self.name!r} (SegAccuracy): labels must be N x 1 x H x W matching scores "
                             f"N x C x H x W; got {list(s)} and {list(l)}")
        self.classes = s[1]
        self.ignore = [int(v) for v in param.seg_accuracy_param.ignore_label]
        self.reset = param.seg_accuracy_param.reset
        self.confusion = torch.zeros(self.classes, self.classes, dtype=torch.float64)

    def top_shapes(self, bottom_shapes):
        return [(1, 1, 1, 3)]

    def forward(self, scores, labels):
        c = self.classes
        s = scores.detach().reshape(scores.shape[0], c, -1)
        # std::partial_sort with greater<pair<value, class>>: ties go to the highest class index
        pred = (c - 1 - s.flip(1).argmax(1)).reshape(-1)
        gt = labels.detach().reshape(-1).trunc().long()  # static_cast<int>
        keep = torch.ones_like(gt, dtype=torch.bool)
        for v in self.ignore:
            keep &= gt != v
        bad = keep & ((gt < 0) | (gt >= c))
        self.check_labels(gt, bad)
        # a fixed-size count (exportable): ignored pixels add 0; a bad label's cell lies past the matrix, so that a
        # graph without the check (ONNX has no assertion) fails on it rather than counting it elsewhere
        cell = torch.where(keep, gt * c + pred, 0).masked_fill(bad, c * c)
        counts = torch.zeros(c * c, dtype=torch.float64, device=gt.device).scatter_add(0, cell, keep.double())
        counts = counts.reshape(c, c)
        if not self.reset:  # state only where it accumulates (an export of the default keeps no attribute)
            self.confusion = counts = self.confusion.to(counts.device) + counts
        return self.metrics(counts).to(scores.dtype).reshape(1, 1, 1, 3)

    def check_labels(self, gt, bad):
        message = f"layer {self.name!r} (SegAccuracy): labels must be in [0, {self.classes}) or an ignore_label"
        if torch.compiler.is_compiling():  # an assertion op in the graph (a branch on values would break it)
            torch._assert_async(~bad.any(), message)
        elif gt.device.type != "meta" and bad.any():
            raise ValueError(f"{message}; got unexpected label {int(gt[bad][0])}")

    @staticmethod
    def metrics(m):
        """ConfusionMatrix accuracy(), avgRecall(false), avgJaccard() of a (label, prediction) matrix, as a
        tensor (tensor ops only: the graph stays exportable)."""
        diag, rows, cols = m.diagonal(), m.sum(1), m.sum(0)
        total = m.sum()
        accuracy = diag.sum() / torch.where(total > 0, total, 1.0)  # 0 without pixels
        seen = rows > 0
        recall = torch.where(seen, diag / torch.where(seen, rows, 1.0), 0.0).sum() / seen.sum().clamp(min=1)
        union = rows + cols - diag
        # a class with intersection == union (absent from both) counts as IoU 1
        iou = torch.where(diag == union, torch.ones_like(diag), diag / torch.where(union > 0, union, 1.0))
        return torch.stack([accuracy, recall, iou.sum() / m.shape[0]])
