"""Whole original deploy nets (embs, vgg) against the original Caffe, layer by layer (golden nets/)."""
import math
import re

import numpy as np
import pytest
import torch

from caffe_layers import Net
from caffe_layers.tools.reference import hashfill_values, sample_positions
from golden import FLT_MAX_100, assert_matches, load_case

RTOL = 1e-3  # golden README: whole-net stats and sampled values
ATOL = 1e-5


def load_params(net, case):
    """Stored `param:` values, else regenerated ones checked against `paramsum:` [sum, sum of squares]."""
    k = 0
    for layer in net.layer_modules:
        for i, blob in enumerate(layer.blobs):
            key = f"{layer.name}:{i}"
            value = case.get(f"param:{key}")
            if value is None:
                value = hashfill_values(layer.param.type, i, blob.shape, k)
                if value is None:  # the rule keeps the layer's own initialisation
                    value = blob.detach().cpu().numpy()
                ref = case[f"paramsum:{key}"]
                ours = [float(np.sum(value, dtype=np.float64)), float(np.sum(np.square(value, dtype=np.float64)))]
                np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6, err_msg=f"regenerated param {key}")
            with torch.no_grad():
                blob.copy_(torch.as_tensor(np.asarray(value)).reshape(blob.shape))
            k += 1


def copied_blob(split_name, blob_names, layer_names):
    """The blob a Caffe-inserted "<blob>_<layer>_<n>_split" layer copies."""
    for blob in blob_names:
        rest = split_name[len(blob) + 1:] if split_name.startswith(blob + "_") else None
        if rest is not None and any(re.fullmatch(re.escape(l) + r"_\d+_split", rest) for l in layer_names):
            return blob
    raise KeyError(f"cannot tell which blob split layer {split_name!r} copies")


def compare(what, value, case, key):
    x = value.detach().double().cpu().numpy()
    assert tuple(x.shape) == tuple(case[f"shape:{key}"]), f"{what}: shape {x.shape}, expected {case[f'shape:{key}']}"
    flat = x.reshape(-1)
    assert_matches(flat[sample_positions(flat.size).astype(np.int64)], case[f"vals:{key}"], RTOL, ATOL, f"{what} sampled values")
    ref = case[f"stats:{key}"]
    special = np.abs(flat) >= FLT_MAX_100 * 0.999
    if not special.any():
        s, ss, m = flat.sum(), np.square(flat).sum(), np.abs(flat).max()
        scale = math.sqrt(ref[1] * flat.size) + abs(ref[0])  # the size of a sum of these values
        assert abs(s - ref[0]) <= ATOL + RTOL * scale, f"{what}: sum {s:.6g}, expected {ref[0]:.6g}"
        assert abs(ss - ref[1]) <= ATOL + RTOL * ref[1], f"{what}: sum of squares {ss:.6g}, expected {ref[1]:.6g}"
        assert abs(m - ref[2]) <= ATOL + RTOL * ref[2], f"{what}: max |x| {m:.6g}, expected {ref[2]:.6g}"


@pytest.mark.parametrize("name", ["embs_deploy_97", "vgg_deploy_97"])
def test_golden_net(name):
    case = load_case(name, "nets")
    net = Net(str(case["prototxt"]), phase="test", fuse=False)  # every layer on its own, as the original ran
    load_params(net, case)
    inputs = {k[3:]: torch.as_tensor(v) for k, v in case.items() if k.startswith("in:")}
    golden = {}  # kkk -> (layer, [(top, key)]) in the original's layer order
    for key in case["order"]:
        k, layer, top = str(key).split(":", 2)
        golden.setdefault(k, (layer, []))[1].append((top, str(key)))
    ours = [s.layer.name for s in net.steps if s.layer.param.type != "Input"]  # the original had net inputs
    splits = [v for v in golden.values() if v[0].endswith("_split") and v[0] not in ours]
    plain = [v for v in golden.values() if not (v[0].endswith("_split") and v[0] not in ours)]
    assert [layer for layer, _ in plain] == ours, f"{name}: the layer sequence differs from the original's"
    failures, produced, current, step_no = [], {}, dict(inputs), iter(range(len(plain)))

    def check(step, tops):
        layer, keys = plain[next(step_no)]
        assert layer == step.layer.name, (layer, step.layer.name)
        for top, value in zip(step.tops, tops):
            produced[(layer, top)] = current[top] = value
        for top, key in keys:
            # The original's dump looked tops up by layer name: for a duplicated name (vgg's two
            # "relu1_1") it recorded the first layer's top blob, as it stood then.
            value = tops[step.tops.index(top)] if top in step.tops else current[top]
            try:
                compare(f"{name} layer {layer!r} top {top!r}", value, case, key)
            except AssertionError as err:
                failures.append(str(err).splitlines()[0])

    with torch.no_grad():
        values = net.run(inputs, hook=check)
    blob_names = list(net.blob_shapes)
    for layer, tops in splits:
        source = copied_blob(layer, blob_names, ours + ["input"])  # "input": Caffe's name for net inputs
        producer = layer[len(source) + 1:].rsplit("_", 2)[0]
        if producer == "input":
            produced[(producer, source)] = inputs[source]
        for top, key in tops:
            try:
                # a split copies its blob as the producing layer left it (before later in-place layers)
                compare(f"{name} split {layer!r} (copy of {source!r})", produced[(producer, source)], case, key)
            except AssertionError as err:
                failures.append(str(err).splitlines()[0])
    for key in case:
        if key.startswith("out:"):
            assert_matches(values[key[4:]].cpu().numpy(), case[key], RTOL, ATOL, f"{name} {key}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["embs_deploy_97", "vgg_deploy_97"])
def test_golden_net_fused_outputs(name):
    """The default (fused segaware convolution) forward gives the original's final outputs too."""
    case = load_case(name, "nets")
    net = Net(str(case["prototxt"]), phase="test")
    load_params(net, case)
    inputs = {k[3:]: torch.as_tensor(v) for k, v in case.items() if k.startswith("in:")}
    with torch.no_grad():
        values = net.run(inputs)
    for key in case:
        if key.startswith("out:"):
            assert_matches(values[key[4:]].cpu().numpy(), case[key], RTOL, ATOL, f"{name} fused {key}")
    last = {str(k).split(":", 2)[2]: str(k) for k in case["order"]}  # each blob's final recorded value
    assert net.outputs
    for blob in (b for b in net.outputs if b not in net.inputs):
        compare(f"{name} fused output {blob!r}", values[blob], case, last[blob])
