"""A Concat's Interp bottoms written straight into its top (TorchNet, lower=True).

vgg deploy's `fused` concatenates 451 channels at 321x321, 384 of them Interp tops: each resized blob was
made, then copied into the Concat's top. Where an Interp's top is read by the Concat alone (not a net output,
not kept, not rewritten in place) and the Interp's bottom keeps its value up to the Concat, the Interp runs
inside the Concat's step: in eager inference (relu.eager_without_autograd) the top is allocated once, each
Interp writes into its slice of it (the same kernel with out=) and the other bottoms are copied in; under
autograd and tracing the step is the Interps' forwards and the Concat's. Same kernels, the same numbers.
"""
from caffe_layers.engine.folding import _version_readers
from caffe_layers.engine.plan import Step
from caffe_layers.layers.base import Layer, leaf_function
from caffe_layers.layers.relu import eager_without_autograd


class ConcatOfInterps:
    """A step's layer: the Concat and, per bottom, the Interp run on it first (or None)."""

    def __init__(self, concat, interps):
        self.concat, self.interps = concat, tuple(interps)
        self.name, self.param = concat.name, concat.param
        self.layers = [m for m in self.interps if m is not None] + [concat]

    def __repr__(self):
        return f"ConcatOfInterps({', '.join(m.name for m in self.layers[:-1])} -> {self.concat.name})"


@leaf_function
def concat_interps(concat, interps, *bottoms):
    """concat(*[x if interp is None else interp(x)]), in eager inference without the Interps' own tops."""
    if not eager_without_autograd() or len({(x.dtype, x.device) for x in bottoms}) > 1:
        return concat(*[x if m is None else m(x) for m, x in zip(interps, bottoms)])
    shapes = [tuple(x.shape) if m is None else tuple(m.top_shapes([x.shape])[0]) for m, x in zip(interps, bottoms)]
    out = bottoms[0].new_empty(concat.top_shapes(shapes)[0])
    start = 0
    for m, x, shape in zip(interps, bottoms, shapes):
        part = out.narrow(concat.axis, start, shape[concat.axis])
        if m is None:
            part.copy_(x)
        else:
            m.forward_into(x, part)
        start += shape[concat.axis]
    return out


def _interp_to_run_inside(steps, ci, blob, needed):
    """The index of the Interp step that Concat step `ci` may run in place of reading `blob`, or None."""
    writers = [i for i in range(ci) if blob in steps[i].tops]
    if not writers or blob in needed or steps[ci].bottoms.count(blob) != 1:
        return None
    i = writers[-1]
    s = steps[i]
    if not (isinstance(s.layer, Layer) and s.layer.param.type == "Interp" and len(s.bottoms) == 1
            and len(s.tops) == 1 and blob not in s.bottoms and not any(s.loss_weights)):
        return None
    if _version_readers(steps, i, blob) != [ci]:
        return None
    if any(s.bottoms[0] in steps[j].tops for j in range(i + 1, ci)):
        return None  # the Interp's bottom is rewritten before the Concat would read it
    return i


def run_interps_in_concats(steps, needed):
    """`steps` with each Concat whose bottoms include Interp tops only it reads as one ConcatOfInterps step;
    `needed`: the blobs that must keep their own values (outputs, kept blobs)."""
    moved, replaced = set(), {}
    for ci, step in enumerate(steps):
        if not (isinstance(step.layer, Layer) and step.layer.param.type == "Concat" and len(step.bottoms) > 1
                and len(step.tops) == 1):
            continue
        found = [_interp_to_run_inside(steps, ci, b, needed) for b in step.bottoms]
        if all(i is None for i in found):
            continue
        bottoms = [b if i is None else steps[i].bottoms[0] for b, i in zip(step.bottoms, found)]
        downs = [d if i is None else d and steps[i].propagate_down[0] for d, i in zip(step.propagate_down, found)]
        layer = ConcatOfInterps(step.layer, [None if i is None else steps[i].layer for i in found])
        replaced[ci] = Step(layer, bottoms, list(step.tops), downs, list(step.loss_weights))
        moved.update(i for i in found if i is not None)
    return [replaced.get(i, s) for i, s in enumerate(steps) if i not in moved]
