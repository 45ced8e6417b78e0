"""Net-level fusion of the segaware convolution chain into one native step.

The segaware configs spell a segmentation-aware convolution as

    mask -> Tile(axis 1, C tiles) = maskC          (mask: K channels, e.g. Im2dist -> Scale -> AbsVal -> Exp,
    x -> Im2col = col                                or Im2dist -> Exp scale: -1)
    Eltwise PROD(col, maskC) = hit;   Convolution{bottom_is_im2col}(hit) = y

which materialises three C*K*H*W blobs (col, maskC, hit). The fused step computes y = segaware_conv(x,
mask, W, b) from the K-channel mask without them; the layers that make the mask run as before (their
blobs are K*H*W, and one mask often feeds several convolutions). A chain is fused if and only if none of
the C*K*H*W blobs is needed: not a net output, not read by another layer, not a loss, not in `keep`, and
not written in place. Only a full forward runs fused steps: a partial run (`Net.run(values, start, end)`,
`forward(start=..., end=...)`, the layer-by-layer dump and compare tools) runs every original layer, so
all blobs are there.
"""
from dataclasses import replace

from caffe_layers.layers.base import canonical_axis
from caffe_layers.native import segaware_conv
from caffe_layers.formats.proto import pb


class FusedSegawareConv:
    """The fused Im2col/Tile/Eltwise/Convolution as a step's layer: bottoms (x, mask), the Convolution's tops."""

    def __init__(self, im2col, tile, eltwise, conv):
        self.im2col, self.tile, self.eltwise, self.conv = im2col, tile, eltwise, conv
        self.name, self.param = conv.name, conv.param
        self.layer_names = [m.name for m in (im2col, tile, eltwise, conv)]

    def __call__(self, x, mask):
        c = self.conv
        return segaware_conv(x, mask, c.blobs[0], c.blobs[1] if c.bias_term else None, self.im2col.kernel,
                             self.im2col.pad, self.im2col.stride, self.im2col.dilation)

    def __repr__(self):
        return f"FusedSegawareConv({' -> '.join(self.layer_names)})"


def fuse_steps(net, keep=()):
    """Steps of `net` with each fusable chain replaced by one FusedSegawareConv step, or None if none is."""
    steps = net.steps
    producers, readers = {}, {}
    for i, s in enumerate(steps):
        for b in s.bottoms:
            readers.setdefault(b, []).append(i)
        for t in s.tops:
            producers.setdefault(t, []).append(i)
    needed = set(keep) | set(net.outputs)

    def only_link(blob, consumer):
        """The step producing `blob`, if blob is a private link from it to step `consumer`."""
        made = producers.get(blob, [])
        if len(made) != 1 or readers.get(blob) != [consumer] or blob in needed:
            return None
        i = made[0]
        s = steps[i]
        if len(s.tops) != 1 or blob in s.bottoms or any(s.loss_weights) or not all(s.propagate_down):
            return None
        return i

    def kind(i, type_name):
        return i is not None and steps[i].layer.param.type == type_name

    removed, fused = set(), {}
    for ci, s in enumerate(steps):
        conv = s.layer
        if (s.layer.param.type != "Convolution" or not getattr(conv, "bottom_is_im2col", False)
                or len(s.bottoms) != 1 or conv.group != 1 or conv.axis != 1 or conv.nsp != 2 or not all(s.propagate_down)):
            continue
        ei = only_link(s.bottoms[0], ci)
        if not kind(ei, "Eltwise") or len(steps[ei].bottoms) != 2:
            continue
        elt = steps[ei].layer
        if elt.op != pb.EltwiseParameter.PROD or not elt.stable_prod_grad:
            continue  # the division-based PROD gradient (NaN at zeros) is not fused
        links = [only_link(b, ei) for b in steps[ei].bottoms]
        if kind(links[1], "Im2col"):
            links.reverse()
        ii, ti = links
        if not (kind(ii, "Im2col") and kind(ti, "Tile")):
            continue
        im2col = steps[ii].layer
        x_name = steps[ii].bottoms[0]
        x_shape = net.blob_shapes[x_name]
        tile = steps[ti].layer
        if (im2col.axis != 1 or len(x_shape) != 4
                or canonical_axis(tile.axis, 4, tile.name) != 1 or tile.tiles != x_shape[1]):
            continue
        mask = steps[ti].bottoms[0]
        K = im2col.kernel[0] * im2col.kernel[1]
        if net.blob_shapes[mask][1] != K or tuple(net.blob_shapes[mask][2:]) != tuple(net.blob_shapes[s.bottoms[0]][2:]):
            continue
        if any(i > ti for i in producers.get(mask, [])) or any(i > ii for i in producers.get(x_name, [])):
            continue  # rewritten in place after the Tile or Im2col read it: the fused step would see other data
        layer = FusedSegawareConv(im2col, tile, elt, conv)
        fused[ci] = replace(s, layer=layer, bottoms=[x_name, mask], propagate_down=[True, True])
        removed |= {ti, ii, ei}
    if not fused:
        return None
    return [fused.get(i, s) for i, s in enumerate(steps) if i not in removed]
