"""Proposal: the region proposal layer of py-faster-rcnn (lib/rpn/proposal_layer.py, a Python
layer there), built in with proposal_param as OpenCV dnn has it.

Bottoms: rpn_cls_prob_reshape (1, 2A, H, W) (background scores of the A anchors, then the
foreground ones), rpn_bbox_pred (1, 4A, H, W), im_info (1, 3) [height, width, scale]. Anchors
are generate_anchors(base_size, ratio, scale) (defaults: ratios 0.5, 1, 2; scales 8, 16, 32)
shifted by feat_stride over the map; the deltas are applied (bbox_transform_inv), boxes clipped
to the image, those under min_size*scale pixels wide or high dropped, the best pre_nms_topn kept,
NMS at nms_thresh (py_cpu_nms: overlap with +1 pixel areas, kept while <= threshold), then the
best post_nms_topn. Top 0: rois (R, 5) [0, x1, y1, x2, y2]; optional top 1: their scores (R, 1).
Arithmetic in float64 as numpy does there, output float32. Only one image, as the original.
Not differentiable (the original's backward does nothing).
"""
import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer


def _whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                      x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def generate_anchors(base_size, ratios, scales):
    """py-faster-rcnn's anchors (x1, y1, x2, y2) around the base_size cell: ratios, then scales."""
    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, x_ctr, y_ctr = _whctrs(base)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    by_ratio = _mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for anchor in by_ratio:
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        out.append(_mkanchors(w * scales, h * scales, x_ctr, y_ctr))
    return np.vstack(out)


def apply_deltas(boxes, deltas):
    """bbox_transform_inv (x2 = ctr + w/2, without py-faster-rcnn's later -1)."""
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    cx = deltas[:, 0] * widths + ctr_x
    cy = deltas[:, 1] * heights + ctr_y
    w = np.exp(deltas[:, 2]) * widths
    h = np.exp(deltas[:, 3]) * heights
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)


def py_cpu_nms(boxes, scores, thresh):
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.flatnonzero(overlap <= thresh) + 1]
    return np.asarray(keep, dtype=np.int64)


@register("Proposal")
class Proposal(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.proposal_param
        self.where = f"layer {self.name!r} (Proposal)"
        if len(bottom_shapes) != 3:
            raise ValueError(f"{self.where}: takes 3 bottoms (scores, bbox deltas, im_info), got {len(bottom_shapes)}")
        ratios = np.array(list(p.ratio) or [0.5, 1, 2], dtype=np.float64)
        scales = np.array(list(p.scale) or [8, 16, 32], dtype=np.float64)
        self.anchors = generate_anchors(p.base_size, ratios, scales)
        self.feat_stride, self.min_size = p.feat_stride, p.min_size
        self.pre_nms, self.post_nms, self.nms_thresh = p.pre_nms_topn, p.post_nms_topn, p.nms_thresh
        self.with_scores = len(param.top) > 1
        a = len(self.anchors)
        scores, deltas, _ = bottom_shapes
        if scores[1] != 2 * a or deltas[1] != 4 * a:
            raise ValueError(f"{self.where}: {a} anchors need scores with {2 * a} and deltas with {4 * a} "
                             f"channels, got {list(scores)} and {list(deltas)}")
        if scores[0] != 1:
            raise ValueError(f"{self.where}: only single-image batches are supported (as py-faster-rcnn)")

    def top_shapes(self, bottom_shapes):
        post = self.post_nms if self.post_nms > 0 else 1
        return [(post, 5), (post, 1)] if self.with_scores else [(post, 5)]

    def propose(self, scores, deltas, im_info):
        a = len(self.anchors)
        height, width = scores.shape[-2:]
        sx, sy = np.meshgrid(np.arange(width) * self.feat_stride, np.arange(height) * self.feat_stride)
        shifts = np.vstack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel())).T
        anchors = (self.anchors.reshape(1, a, 4) + shifts.reshape(-1, 1, 4)).reshape(-1, 4)
        fg = scores[:, a:].transpose(0, 2, 3, 1).reshape(-1)
        d = deltas.transpose(0, 2, 3, 1).reshape(-1, 4)
        boxes = apply_deltas(anchors, d)
        im_h, im_w, im_scale = im_info[0, :3]
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, im_w - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, im_h - 1)
        ws = boxes[:, 2] - boxes[:, 0] + 1
        hs = boxes[:, 3] - boxes[:, 1] + 1
        keep = np.flatnonzero((ws >= self.min_size * im_scale) & (hs >= self.min_size * im_scale))
        boxes, fg = boxes[keep], fg[keep]
        order = fg.argsort()[::-1]
        if self.pre_nms > 0:
            order = order[:self.pre_nms]
        boxes, fg = boxes[order], fg[order]
        keep = py_cpu_nms(boxes, fg, self.nms_thresh)
        if self.post_nms > 0:
            keep = keep[:self.post_nms]
        boxes, fg = boxes[keep], fg[keep]
        rois = np.hstack((np.zeros((len(boxes), 1)), boxes)).astype(np.float32)
        return rois, fg.astype(np.float32).reshape(-1, 1)

    def forward(self, scores, deltas, im_info):
        arrays = [t.detach().cpu().numpy() for t in (scores, deltas, im_info)]
        if arrays[0].shape[0] != 1:
            raise ValueError(f"{self.where}: only single-image batches are supported (as py-faster-rcnn)")
        rois, fg = self.propose(*arrays)
        tops = [torch.as_tensor(t).to(device=scores.device, dtype=scores.dtype) for t in (rois, fg)]
        return tuple(tops) if self.with_scores else tops[0]
