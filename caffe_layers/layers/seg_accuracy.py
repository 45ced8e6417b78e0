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
        gt, pred = gt[keep], pred[keep]
        bad = (gt < 0) | (gt >= c)
        if bad.any():
            raise ValueError(f"layer {self.name!r} (SegAccuracy): unexpected label {int(gt[bad][0])}; "
                             f"labels must be in [0, {c}) or an ignore_label")
        counts = torch.bincount(gt * c + pred, minlength=c * c).reshape(c, c).to(torch.float64).cpu()
        self.confusion = counts if self.reset else self.confusion + counts
        return torch.tensor(self.metrics(self.confusion), dtype=scores.dtype, device=scores.device).reshape(1, 1, 1, 3)

    @staticmethod
    def metrics(m):
        """ConfusionMatrix accuracy(), avgRecall(false), avgJaccard() of a (label, prediction) matrix."""
        diag, rows, cols = m.diagonal(), m.sum(1), m.sum(0)
        total = float(m.sum())
        accuracy = float(diag.sum()) / total if total else 0.0
        seen = rows > 0
        recall = float((diag[seen] / rows[seen]).sum()) / int(seen.sum()) if seen.any() else 0.0
        union = rows + cols - diag
        # a class with intersection == union (absent from both) counts as IoU 1
        iou = torch.where(diag == union, torch.ones_like(diag), diag / torch.where(union > 0, union, 1.0))
        return [accuracy, recall, float(iou.sum()) / m.shape[0]]
