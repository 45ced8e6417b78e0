"""SSSMetricLoss: the metric loss of Semantic Soft Segmentation's feature network (Aksoy et al. 2018).

Bottoms: embeddings (N, D, H, W) and an instance label map (N, 1, H, W) (every distinct value is an
instance). Per image, num_instances distinct instances are drawn at random and samples_per_instance
pixels of each, with replacement (as get_batch_1chunk in iyah4888/SIGGRAPH18SSS). Over all P x P pairs
of the P sampled pixels (the diagonal included, as the released code's mean), with I = 1 for pairs of
one instance and s(d) = 2 / (1 + exp(d)):
  PAPER:    loss = mean(-[I log s(d) + (1 - I) log(1 - s(d))]), d = ||f_p - f_q||_2
  RELEASED: loss = mean(-(3 I log s(d) + (1 - I) log(1 - s(d)))), d = ||f_p - f_q||^2 / 64
            (the released lossfunction: weights -(indicator + 2) with indicator +-1; it divides by 64
            although its features are 128-d)
Images with fewer instances than num_instances are skipped, as the released training loop skips
them; the loss is the mean over the images used (0 when none is).
"""
import math

import torch
import torch.nn.functional as F

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer, optional
from caffe_layers.formats.proto import pb

_TINY = 1e-12  # below this squared distance the L2 distance's gradient is taken as 0


@register("SSSMetricLoss")
class SSSMetricLoss(Layer):
    is_loss = True

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.sss_metric_loss_param
        self.released = p.form == pb.SSSMetricLossParameter.RELEASED
        self.k, self.s = p.num_instances, p.samples_per_instance
        self.scale = p.distance_scale
        self.ignore = optional(p, "ignore_label")
        if self.k < 2 or self.s < 1:
            raise ValueError(f"layer {self.name!r} (SSSMetricLoss): need num_instances >= 2 and "
                             f"samples_per_instance >= 1, got {self.k} and {self.s}")
        if len(bottom_shapes) != 2:
            raise ValueError(f"layer {self.name!r} (SSSMetricLoss): expected 2 bottoms (embeddings, labels), "
                             f"got {len(bottom_shapes)}")
        e, lab = self.bottom_shapes
        if len(e) != 4 or tuple(lab) != (e[0], 1, e[2], e[3]):
            raise ValueError(f"layer {self.name!r} (SSSMetricLoss): embeddings must be (N, D, H, W) and labels "
                             f"(N, 1, H, W); got {e} and {lab}")
        self.gen = torch.Generator().manual_seed(p.seed or torch.initial_seed())

    def top_shapes(self, bottom_shapes):
        return [()]

    def sample(self, labels):
        """Flat pixel indices (P,) and instance ids (P,) for one label map (H, W), or None."""
        flat = labels.reshape(-1).cpu()
        ids = torch.unique(flat)
        if self.ignore is not None:
            ids = ids[ids != self.ignore]
        if len(ids) < self.k:
            return None
        chosen = ids[torch.randperm(len(ids), generator=self.gen)[:self.k]]
        idx = []
        for inst in chosen:
            where = torch.nonzero(flat == inst).squeeze(1)
            idx.append(where[torch.randint(len(where), (self.s,), generator=self.gen)])
        return torch.cat(idx), torch.arange(self.k).repeat_interleave(self.s)

    def pair_loss(self, f, inst):
        """The loss of sampled features f (P, D) with instance indices inst (P,)."""
        sq = (f * f).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2 * f @ f.t()
        same = inst[:, None] == inst[None, :]
        if self.released:
            d = d2 / self.scale
        else:
            d = torch.sqrt(d2.clamp(min=_TINY))
        log_s = math.log(2.0) - F.softplus(d)             # log(2 / (1 + e^d))
        # log(1 - 2 / (1 + e^d)); same-instance entries (d ~ 0 on the diagonal) are masked first so
        # that their unused log(0) cannot put 0 * inf = NaN into the gradient
        log_1ms = torch.log(torch.tanh(torch.where(same, torch.ones_like(d), d) / 2))
        w_same = 3.0 if self.released else 1.0
        return -torch.where(same, w_same * log_s, log_1ms).mean()

    def forward(self, emb, labels):
        n, dim = emb.shape[:2]
        losses = []
        for i in range(n):
            picked = self.sample(labels[i, 0])
            if picked is None:
                continue
            idx, inst = picked
            f = emb[i].reshape(dim, -1)[:, idx.to(emb.device)].t()
            losses.append(self.pair_loss(f, inst.to(emb.device)))
        if not losses:
            return emb.sum() * 0
        return torch.stack(losses).mean()
