"""GateRecurrent2dnoind (caffe-spn): spatial propagation in one direction, see caffe_layers.ops.spn.

Bottoms (x, g1, g2, g3) of one (N, C, H, W) shape, top h. gaterecurrent2dnoind_param.horizontal /
.reverse pick the scan: left->right (true, false), right->left (true, true), top->bottom
(false, false), bottom->top (false, true). num_output and active are parsed but, as in the
original, unused.

Extension (ours): gaterecurrent2dnoind_param { connection: ONE } is the paper's one-way connection
(eq. 9) with bottoms (x, g); THREE is the original. Unset, it follows the bottoms: 2 give ONE.
"""
from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.native import gate_recurrent
from caffe_layers.formats.proto import pb


@register("GateRecurrent2dnoind")
class GateRecurrent2dnoind(Layer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.gaterecurrent2dnoind_param
        self.horizontal, self.reverse = p.horizontal, p.reverse
        n = len(bottom_shapes)
        if p.HasField("connection"):
            self.connection = pb.GateRecurrent2dnoindParameter.Connection.Name(p.connection).lower()
        else:
            self.connection = "one" if n == 2 else "three"
        expected = {"three": 4, "one": 2}[self.connection]
        if n != expected:
            raise ValueError(f"layer {self.name!r} (GateRecurrent2dnoind): the {self.connection}-way "
                             f"connection takes {expected} bottoms "
                             f"({'x, g1, g2, g3' if expected == 4 else 'x, g'}), got {n}")
        shapes = self.bottom_shapes
        if len(shapes[0]) != 4 or any(s != shapes[0] for s in shapes):
            raise ValueError(f"layer {self.name!r} (GateRecurrent2dnoind): all bottoms must have one "
                             f"(N, C, H, W) shape, got {[list(s) for s in shapes]}")

    def top_shapes(self, bottom_shapes):
        shapes = [tuple(s) for s in bottom_shapes]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"layer {self.name!r} (GateRecurrent2dnoind): all bottoms must have one "
                             f"(N, C, H, W) shape, got {[list(s) for s in shapes]}")
        return [shapes[0]]

    def forward(self, x, *gates):
        if self.connection == "one":
            return gate_recurrent(x, gates[0], None, None, self.horizontal, self.reverse, "one")
        return gate_recurrent(x, *gates, self.horizontal, self.reverse)

    def extra_repr(self):
        direction = {(True, False): "left->right", (True, True): "right->left",
                     (False, False): "top->bottom", (False, True): "bottom->top"}
        return f"{self.name!r}, {direction[(self.horizontal, self.reverse)]}, {self.connection}-way"
