"""Shared test helpers: the golden cases from the original Caffe fork, and float64 gradchecks."""
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from caffe_layers import Net
from caffe_layers.layers import layer_class
from caffe_layers.formats.proto import TEST, pb, phase_value

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden"
REFERENCE = SHARED / "reference"
FLT_MAX_100 = np.float32(3.4028235e36)  # what Im2dist writes for removed neighbours


def load_case(name, kind="layers"):
    with np.load(GOLDEN / kind / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def assert_matches(ours, ref, rtol=1e-4, atol=1e-5, what="blob"):
    """max|ours - ref| <= atol + rtol * max|ref| (golden README); FLT_MAX/100 entries exactly."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, expected {ref.shape}"
    special = np.abs(ref) >= FLT_MAX_100 * 0.999
    np.testing.assert_array_equal(ours[special], ref[special], err_msg=f"{what}: FLT_MAX/100 entries")
    if (~special).any():
        err = np.abs(ours - ref)[~special].max()
        bound = atol + rtol * np.abs(ref[~special]).max()
        assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def net_from_case(case, **kwargs):
    return Net(str(case["prototxt"]), phase=str(case["phase"]).lower(), **kwargs)


def check_golden(name, rtol=1e-4, atol=1e-5, exact=(), net=None):
    """Run a golden layer case forward (and backward when it has gradients) and compare every blob.

    `exact` names output blobs that must match exactly (integer-valued outputs).
    """
    case = load_case(name)
    # every compared blob must be materialised (no fusion across them, see caffe_layers/engine/fusion.py)
    net = net or net_from_case(case, keep_blobs=[k[4:] for k in case if k.startswith("out:")])
    for key, value in case.items():
        if key.startswith("param:"):
            _, layer, i = key.split(":")
            net.params[layer][int(i)].data[...] = value
    inputs = {k[3:]: v for k, v in case.items() if k.startswith("in:")}
    net.forward(**inputs)
    for key, ref in case.items():
        if key.startswith("out:"):
            blob = key[4:]
            ours = net.blobs[blob].data
            if blob in exact:
                np.testing.assert_array_equal(ours, ref, err_msg=f"{name} {key}")
            else:
                assert_matches(ours, ref, rtol, atol, f"{name} {key}")
    if not any(k.startswith(("grad:", "pgrad:")) for k in case):
        return net
    for key, value in case.items():
        if key.startswith("topdiff:"):
            net.blobs[key[8:]].diff[...] = value
    net.backward()
    for key, ref in case.items():
        if key.startswith("grad:"):
            assert_matches(net.blobs[key[5:]].diff, ref, rtol, atol, f"{name} {key}")
        elif key.startswith("pgrad:"):
            _, layer, i = key.split(":")
            assert_matches(net.params[layer][int(i)].diff, ref, rtol, atol, f"{name} {key}")
    return net


def assert_same_net(ours, orig, what, same_layer=None):
    """Two NetParameters equal layer for layer, field for field (then the net-level fields).

    `same_layer(a, b)`, where given, may check a pair of layers itself and return True to skip the
    field-for-field comparison of that pair.
    """
    assert [lp.name for lp in ours.layer] == [lp.name for lp in orig.layer], what
    for a, b in zip(ours.layer, orig.layer):
        if same_layer is None or not same_layer(a, b):
            assert a == b, f"{what} layer {b.name!r}:\n{a}\nvs original\n{b}"
    a, b = pb.NetParameter(), pb.NetParameter()
    a.CopyFrom(ours), b.CopyFrom(orig)
    a.ClearField("layer"), b.ClearField("layer")
    assert a == b, what


def make_layer(layer_text, bottom_shapes, phase=TEST, dtype=torch.float64):
    """A layer module from one `layer { ... }` body (prototxt text), in float64 by default."""
    lp = text_format.Parse(layer_text, pb.LayerParameter())
    if not lp.name:
        lp.name = "L"
    layer = layer_class(lp.type, lp.name)(lp, [tuple(s) for s in bottom_shapes], phase_value(phase))
    return layer.to(dtype)


def gradcheck_layer(layer_text, bottom_shapes, phase=TEST, inputs=None, grad_inputs=None, params=True,
                    seed=0, **gradcheck_kwargs):
    """torch.autograd.gradcheck in float64 with respect to the bottoms and the parameter blobs.

    `inputs` overrides the random bottoms; `grad_inputs` lists which bottoms get gradients
    (default all); `params=False` leaves the parameter blobs out.
    """
    torch.manual_seed(seed)
    layer = make_layer(layer_text, bottom_shapes, phase)
    if inputs is None:
        inputs = [torch.randn(s, dtype=torch.float64) for s in bottom_shapes]
    inputs = [torch.as_tensor(x, dtype=torch.float64) for x in inputs]
    grad_inputs = range(len(inputs)) if grad_inputs is None else grad_inputs
    for i in grad_inputs:
        inputs[i].requires_grad_(True)
    names = [n for n, _ in layer.named_parameters()] if params else []
    values = [p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()] if params else []

    def fn(*args):
        xs, ps = args[:len(inputs)], args[len(inputs):]
        out = torch.func.functional_call(layer, dict(zip(names, ps)), xs)
        return out

    assert torch.autograd.gradcheck(fn, tuple(inputs) + tuple(values), **gradcheck_kwargs)
    return layer


class OnStreamZero:
    """A CUDA-kernel module called like the CPU one: the stream argument (unused by the emulation) added."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        return lambda *args: kernel(*args, 0)


def vary_batchnorm(net):
    """Give every BatchNorm and Scale of `net` statistics and scales away from their fillers' identity (tests of
    folding them into the convolutions; torch's global generator)."""
    with torch.no_grad():
        for layer in net.layer_modules:
            if layer.param.type == "BatchNorm":
                layer.blobs[0].normal_()
                layer.blobs[1].uniform_(0.5, 2)
                layer.blobs[2].fill_(0.8)
            elif layer.param.type == "Scale":
                layer.blobs[0].uniform_(0.5, 1.5)
                if len(layer.blobs) > 1:
                    layer.blobs[1].normal_()
