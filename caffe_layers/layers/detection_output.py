"""DetectionOutput (SSD fork): decode the location predictions against the priors, per-class
NMS, keep_top_k per image; top (1, 1, num_kept, 7) rows [image_id, label, confidence, xmin,
ymin, xmax, ymax], or, when no image has a detection, one row [i, -1, -1, -1, -1, -1, -1] per
image i (the fork's "no detection" row).

Bottoms: loc (N, priors*loc_classes*4), conf (N, priors*num_classes) (after Softmax), priors
(1, 2, priors*4) from PriorBox. Rows come image by image, labels ascending, each label's boxes in
the order NMS kept them (by descending score). The arithmetic is float32 as the fork's CPU code;
the fork's std::sort of the keep_top_k candidates is not stable, so the order of equal scores
there may differ. Not differentiable (the fork has no Backward); the top carries no gradient.
save_output_param (writing results files) and visualize are not implemented and are refused.
"""
import numpy as np
import torch

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, optional
from caffe_layers.formats.proto import pb

CODE = pb.PriorBoxParameter


def decode_boxes(priors, variances, loc, code_type, variance_encoded_in_target):
    """(P, 4) decoded corners from (P, 4) priors, variances and predictions (float32)."""
    f32 = np.float32
    var = np.ones_like(variances) if variance_encoded_in_target else variances
    if code_type == CODE.CORNER:
        return priors + var * loc
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == CODE.CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=1)
        return priors + var * loc * scale
    cx = (priors[:, 0] + priors[:, 2]) / f32(2)
    cy = (priors[:, 1] + priors[:, 3]) / f32(2)
    dcx = var[:, 0] * loc[:, 0] * pw + cx
    dcy = var[:, 1] * loc[:, 1] * ph + cy
    dw = np.exp(var[:, 2] * loc[:, 2]) * pw
    dh = np.exp(var[:, 3] * loc[:, 3]) * ph
    return np.stack([dcx - dw / f32(2), dcy - dh / f32(2), dcx + dw / f32(2), dcy + dh / f32(2)], axis=1)


def box_sizes(boxes):
    """BBoxSize of normalised boxes: width * height, 0 for an inverted box."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return np.where((w < 0) | (h < 0), np.float32(0), w * h).astype(np.float32)


def jaccard(box, sizes_box, others, sizes_others):
    """JaccardOverlap of one box against others, as the fork (0 without an intersection)."""
    apart = ((others[:, 0] > box[2]) | (others[:, 2] < box[0]) |
             (others[:, 1] > box[3]) | (others[:, 3] < box[1]))
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    inter = iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (sizes_box + sizes_others - inter)
    return np.where(apart | ~((iw > 0) & (ih > 0)), np.float32(0), iou)


def nms_fast(boxes, scores, score_threshold, nms_threshold, eta, top_k):
    """ApplyNMSFast: indices kept, best first."""
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    sizes = box_sizes(boxes)
    kept = []
    threshold = np.float32(nms_threshold)
    for idx in order:
        keep = True
        if kept:
            k = np.asarray(kept)
            keep = bool(np.all(jaccard(boxes[idx], sizes[idx], boxes[k], sizes[k]) <= threshold))
        if keep:
            kept.append(int(idx))
            if eta < 1 and threshold > 0.5:
                threshold = np.float32(threshold * np.float32(eta))
    return kept


@register("DetectionOutput")
class DetectionOutput(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.detection_output_param
        self.where = where = f"layer {self.name!r} (DetectionOutput)"
        if not p.HasField("num_classes"):
            raise ValueError(f"{where}: must specify num_classes")
        if len(bottom_shapes) != 3:
            raise ValueError(f"{where}: takes 3 bottoms (loc, conf, priors), got {len(bottom_shapes)}")
        if p.save_output_param.output_directory or p.visualize:
            raise ValueError(f"{where}: save_output_param.output_directory and visualize (writing result "
                             f"files, drawing) are not implemented")
        if not p.normalized_bbox:
            raise ValueError(f"{where}: normalized_bbox: false (an OpenCV extension) is not implemented")
        self.num_classes = p.num_classes
        self.share_location = p.share_location
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background = p.background_label_id
        if self.share_location and self.background == -1:
            # the fork skips decoding label -1 when it is the background id, then fails to find it
            raise ValueError(f"{where}: share_location with background_label_id -1 makes the SSD fork "
                             f"abort (it finds no location predictions for label -1)")
        self.code_type = p.code_type
        self.variance_in_target = p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence_threshold = optional(p, "confidence_threshold")
        if self.confidence_threshold is None:
            self.confidence_threshold = -np.finfo(np.float32).max
        self.nms_threshold, self.eta = p.nms_param.nms_threshold, p.nms_param.eta
        if self.nms_threshold < 0:
            raise ValueError(f"{where}: nms_threshold must be non negative")
        if not 0 < self.eta <= 1:
            raise ValueError(f"{where}: eta must be in (0, 1], got {self.eta}")
        self.top_k = p.nms_param.top_k if p.nms_param.HasField("top_k") else -1

    def top_shapes(self, bottom_shapes):
        self._check(bottom_shapes)
        return [(1, 1, bottom_shapes[0][0], 7)]   # the shape of the "no detection" rows

    def _check(self, shapes):
        loc, conf, priors = shapes
        if len(priors) < 3 or priors[2] % 4:
            raise ValueError(f"{self.where}: priors bottom must be (1, 2, 4*priors), got {list(priors)}")
        n = priors[2] // 4
        if loc[0] != conf[0]:
            raise ValueError(f"{self.where}: loc and conf have different num ({loc[0]} and {conf[0]})")
        if len(loc) < 2 or loc[1] != n * self.loc_classes * 4:
            raise ValueError(f"{self.where}: loc channels must be priors*loc_classes*4 = "
                             f"{n * self.loc_classes * 4}, got shape {list(loc)}")
        if len(conf) < 2 or conf[1] != n * self.num_classes:
            raise ValueError(f"{self.where}: conf channels must be priors*num_classes = "
                             f"{n * self.num_classes}, got shape {list(conf)}")
        return n

    def detect(self, loc, conf, priors):
        """float32 numpy in, (rows, 7) float32 numpy out."""
        num = loc.shape[0]
        n = self._check([loc.shape, conf.shape, priors.shape])
        prior_boxes = priors[0, 0].reshape(n, 4)
        prior_vars = priors[0, 1].reshape(n, 4)
        if self.code_type != CODE.CORNER and (np.any(prior_boxes[:, 2] - prior_boxes[:, 0] <= 0) or
                                              np.any(prior_boxes[:, 3] - prior_boxes[:, 1] <= 0)):
            raise ValueError(f"{self.where}: a prior box has no positive width and height")
        rows = []
        for i in range(num):
            loc_i = loc[i].reshape(n, self.loc_classes, 4)
            scores = conf[i].reshape(n, self.num_classes)
            decoded = {}
            for c in range(self.loc_classes):
                label = -1 if self.share_location else c
                if label != self.background:
                    decoded[label] = decode_boxes(prior_boxes, prior_vars, loc_i[:, c],
                                                  self.code_type, self.variance_in_target)
            picked = {}
            for c in range(self.num_classes):
                if c == self.background:
                    continue
                boxes = decoded[-1 if self.share_location else c]
                picked[c] = nms_fast(boxes, scores[:, c], self.confidence_threshold,
                                     self.nms_threshold, self.eta, self.top_k)
            total = sum(len(v) for v in picked.values())
            if self.keep_top_k > -1 and total > self.keep_top_k:
                pairs = [(scores[j, c], c, j) for c, kept in picked.items() for j in kept]
                pairs.sort(key=lambda t: -t[0])
                picked = {}
                for _, c, j in pairs[:self.keep_top_k]:
                    picked.setdefault(c, []).append(j)
            for c in sorted(picked):
                boxes = decoded[-1 if self.share_location else c]
                for j in picked[c]:
                    rows.append([i, c, scores[j, c], *boxes[j]])
        if not rows:
            out = np.full((num, 7), -1, dtype=np.float32)
            out[:, 0] = np.arange(num)
            return out
        return np.asarray(rows, dtype=np.float32)

    def forward(self, loc, conf, priors):
        as_np = [t.detach().to("cpu", torch.float32).numpy() for t in (loc, conf, priors)]
        out = self.detect(*as_np)
        return torch.as_tensor(out).to(device=loc.device, dtype=loc.dtype).reshape(1, 1, -1, 7)
