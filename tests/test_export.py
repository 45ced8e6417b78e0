"""`caffe-layers export`: ONNX that onnxruntime runs with no custom-op library gives our numbers; .pt2 round trip."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from caffe_layers import native
from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.cli import main
from caffe_layers.tools.export import example_inputs, export_onnx, export_pt2
from caffe_layers.tools.reference import fill_net_hash
from test_custom_ops import SEGAWARE_NET

STANDARD = """
name: "standard"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "pool2" type: "Pooling" bottom: "pool1" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool2" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "segaware"))

SPN = """
name: "spn"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 6 dim: 7 } } }
layer { name: "g" type: "Input" top: "g" input_param { shape { dim: 1 dim: 6 dim: 6 dim: 7 } } }
layer { name: "gates" type: "Slice" bottom: "g" top: "g1" top: "g2" top: "g3" slice_param { axis: 1 } }
layer { name: "t1" type: "TanH" bottom: "g1" top: "g1" }
layer { name: "rnn" type: "GateRecurrent2dnoind" bottom: "x" bottom: "g1" bottom: "g2" bottom: "g3" top: "h"
        gaterecurrent2dnoind_param { horizontal: true reverse: false } }
layer { name: "rnn2" type: "GateRecurrent2dnoind" bottom: "h" bottom: "g1" bottom: "g2" bottom: "g3" top: "v"
        gaterecurrent2dnoind_param { horizontal: false reverse: true } }
"""


def small(path, sizes):
    """A config's text with its dims, Interp/Resize sizes and Tile counts replaced, in one pass."""
    with open(path) as f:
        return re.sub(r"\b(dim|height|width|tiles): (\d+)\b",
                      lambda m: f"{m.group(1)}: {sizes.get(m.group(2), m.group(2))}", f.read())


def check_onnx(net, path):
    fill_net_hash(net)  # not zeros
    inputs = example_inputs(net)
    export_onnx(net, path, inputs)
    with torch.no_grad(), native.disabled():
        expected = net(**inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert set(names) == {b for b in net.outputs if b not in net.inputs}
    for name, got in zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})):
        want = expected[name].numpy()
        scale = max(float(np.abs(want).max()), 1e-6)
        assert np.abs(got - want).max() <= 1e-4 * scale, f"{name}: {np.abs(got - want).max()} vs scale {scale}"
    return session, expected


@pytest.mark.parametrize("config", ["embs", "vgg"])
def test_onnx_segaware_deploy(config, tmp_path):
    net = TorchNet(small(f"models/segaware/{config}/deploy.prototxt", {"321": "41"}))  # fused, as the CLI builds it
    assert ("caffe_layers_native_segaware_conv" in net.code) == (config == "vgg")  # the fused step exports too
    check_onnx(net, tmp_path / "net.onnx")


@pytest.mark.parametrize("fuse", [True, False])
def test_onnx_segaware_chain(fuse, tmp_path):
    """Im2dist -> Exp -> Tile, Im2col, Eltwise PROD, Convolution{bottom_is_im2col} (one fused step or the four
    layers) and NormConv."""
    net = TorchNet(SEGAWARE_NET, fuse=fuse)
    assert ("caffe_layers_native_segaware_conv" in net.code) == fuse
    check_onnx(net, tmp_path / "net.onnx")


def reduced_res_deploy():
    """The res deploy net as models/segaware/make_segaware.py writes it, with one block in each of ResNet-101's
    first three stages and two (res5a, res5c) in the last, instead of 3/4/23/3: the same layer types
    (Convolution -> BatchNorm -> Scale folded, dilated convolutions, Eltwise SUM and MAX, Pooling, Power, Interp,
    Concat, DummyData xy, Split, NormConvMeanfield), projection and identity shortcuts, three scales, the same
    head; at 65x65 (its other inputs and the DummyData to match)."""
    import make_segaware

    stages = [(stage, blocks[:1] if stage < 5 else [blocks[0], blocks[-1]], width, stride, dil)
              for stage, blocks, width, stride, dil in make_segaware.RES_STAGES]
    saved = make_segaware.RES_STAGES
    make_segaware.RES_STAGES = stages
    try:
        text = make_segaware.to_text(make_segaware.res_net("deploy"))
    finally:
        make_segaware.RES_STAGES = saved
    sizes = {"513": "65", "385": "49", "257": "33", "65": "9"}
    return re.sub(r"\b(dim): (\d+)\b", lambda m: f"dim: {sizes.get(m.group(2), m.group(2))}", text)


def test_onnx_reduced_res_deploy(tmp_path):
    net = TorchNet(reduced_res_deploy())
    assert sum(n.target.__name__ == "folded_convolution" for n in net.graph.nodes if n.op == "call_function") > 20
    assert {"NormConvMeanfield", "Interp", "Split", "DummyData", "Concat", "Eltwise", "Power"} <= {
        layer.param.type for layer in net.layer_modules}
    check_onnx(net, tmp_path / "net.onnx")


def test_onnx_spn(tmp_path):
    check_onnx(TorchNet(SPN), tmp_path / "net.onnx")


def test_onnx_standard_dynamic_batch_and_refusal(tmp_path):
    path = tmp_path / "net.onnx"
    net = TorchNet(STANDARD)
    session, _ = check_onnx(net, path)
    x = torch.rand(5, 3, 16, 16)  # another batch size (InnerProduct fixes the spatial size)
    got = session.run(None, {"data": x.numpy()})[0]
    with torch.no_grad(), native.disabled():
        np.testing.assert_allclose(got, net(data=x)["prob"].numpy(), rtol=1e-4, atol=1e-6)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        export_onnx(net, path)
    assert path.read_bytes() == before


def test_cli_export_onnx_and_pt2(tmp_path, capsys):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(STANDARD.replace("num_output: 6", "num_output: 6 weight_filler { type: \"gaussian\" }"))
    onnx_path, pt2_path = tmp_path / "net.onnx", tmp_path / "net.pt2"
    assert main(["export", str(prototxt), "-o", str(onnx_path)]) == 0
    assert onnx_path.exists() and "wrote" in capsys.readouterr().out
    assert main(["export", str(prototxt), "-o", str(onnx_path)]) != 0  # exists, no --force
    assert main(["export", str(prototxt), "-o", str(onnx_path), "--force"]) == 0
    assert main(["export", str(prototxt), "--format", "pt2", "-o", str(pt2_path)]) == 0
    assert torch.export.load(str(pt2_path)).module()(data=torch.rand(2, 3, 16, 16))["prob"].shape == (2, 5)


def test_pt2_round_trip(tmp_path):
    net = TorchNet(small("models/segaware/embs/deploy.prototxt", {"321": "41"}), fuse=False)
    fill_net_hash(net)
    path = tmp_path / "net.pt2"
    export_pt2(net, path)
    loaded = torch.export.load(str(path)).module()
    inputs = example_inputs(net, batch=3)  # the batch axis is dynamic
    with torch.no_grad(), native.disabled():
        expected = net(**inputs)
    got = loaded(**inputs)
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value)


def spn_voc_deploy():
    """The SPN VOC deploy net with an Input layer in place of its Python data layer (SPNDataLayer reads VOC
    files), at 32x32."""
    from google.protobuf import text_format

    from caffe_layers.formats.proto import pb

    net = text_format.Parse((ROOT / "models/spn/voc_rnn_deploy_vgg_v3.prototxt").read_text(), pb.NetParameter())
    assert net.layer[0].type == "Python" and list(net.layer[0].top) == ["data", "label"]
    data = pb.LayerParameter(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[1, 24, 32, 32])
    data.input_param.shape.add(dim=[1, 1, 32, 32])
    net.layer[0].CopyFrom(data)
    return text_format.MessageToString(net)


DEPLOY = {  # every deploy config under models/ (equal field by field to ../shared/reference's), at small sizes
    "embs": lambda: small("models/segaware/embs/deploy.prototxt", {"321": "41"}),
    "vgg": lambda: small("models/segaware/vgg/deploy.prototxt", {"321": "41"}),
    "res": reduced_res_deploy,  # the whole one (1390 layers) takes 15 s of CPU to capture: benchmarks/bench_nets.py
    "flownet": lambda: small("models/segaware/flownet/flownet_segaware_deploy.prototxt", {"384": "64", "512": "128"}),
    "sss": lambda: small("models/sss/sss_deploy.prototxt", {"513": "33"}),
    "spn_helen": lambda: small("models/spn/parsing_rnn_strd2_v4.prototxt", {"40": "1", "128": "32"}),
    "spn_voc": spn_voc_deploy,
}


@pytest.mark.parametrize("config", DEPLOY)
def test_compile_fullgraph_deploy(config):
    """torch.compile(fullgraph=True) captures every deploy net whole, native kernels (custom ops) and fused steps
    included, and gives the eager numbers (the eager backend: dynamo's capture without inductor's C++ build)."""
    net = TorchNet(DEPLOY[config]())
    fill_net_hash(net)
    inputs = example_inputs(net)
    with torch.no_grad():  # before any eager forward: nothing cached by one (Interp's matrices) helps the capture
        got = torch.compile(net, fullgraph=True, backend="eager")(**inputs)
    # under autograd the eager net folds BatchNorm/Scale in the graph, as a traced one does; without grad it keeps
    # its folded (oneDNN-reordered) weights, which round differently
    expected = {blob: value.detach() for blob, value in net(**inputs).items()}
    with torch.no_grad():
        kept = net(**inputs)
    assert set(got) == set(expected)
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value, rtol=0, atol=0)
        torch.testing.assert_close(kept[blob], value, rtol=1e-4, atol=1e-5)


LOSS_NET = """
layer { name: "d" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3
        weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


def test_label_check_inside_compiled_and_exported_graphs():
    """SoftmaxWithLoss's label range check is an assertion op inside compiled and exported graphs (no graph break)."""
    net = TorchNet(LOSS_NET)
    x, good, bad = torch.rand(2, 3), torch.tensor([0.0, 2.0]), torch.tensor([0.0, 3.0])
    with torch.no_grad():
        compiled = torch.compile(net, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x=x, y=good)["loss"], net(x=x, y=good)["loss"])
        with pytest.raises(Exception):  # fullgraph dynamo reports the assertion's RuntimeError as its own error
            compiled(x=x, y=bad)
        program = torch.export.export(net, (), {"x": x, "y": good}).module()
        with pytest.raises(RuntimeError, match=r"layer 'loss': labels must lie in \[0, 3\)"):
            program(x=x, y=bad)
        with pytest.raises(ValueError, match=r"layer 'loss': labels must lie in \[0, 3\)"):
            net(x=x, y=bad)


LOADER = """
import sys
import torch
if sys.argv[4] == "custom":
    import caffe_layers.native  # registers torch.ops.caffe_layers.*
program = torch.export.load(sys.argv[1])
torch.save({blob: value.detach() for blob, value in program.module()(**torch.load(sys.argv[2])).items()}, sys.argv[3])
print("caffe_layers imported:", "caffe_layers" in sys.modules)
"""


def load_in_fresh_process(pt2, inputs, tmp_path, mode):
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(pt2), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt"), mode], capture_output=True, text=True, cwd=tmp_path)
    return done, (torch.load(tmp_path / "out.pt") if done.returncode == 0 else None)


def test_pt2_segaware_custom_ops_in_fresh_process(tmp_path):
    """caffe-layers export --format pt2 --custom-ops of the vgg deploy net (fused seg-aware convolutions,
    Im2dist): a fresh process that imports torch and caffe_layers.native loads and runs it with our numbers;
    without that import it cannot; the default .pt2 (references) runs with torch alone."""
    prototxt, weights = tmp_path / "vgg.prototxt", tmp_path / "vgg.caffemodel"
    prototxt.write_text(small("models/segaware/vgg/deploy.prototxt", {"321": "41"}))
    net = TorchNet(str(prototxt))
    fill_net_hash(net)
    net.save(weights)
    for flags, name in ((["--custom-ops"], "custom.pt2"), ([], "plain.pt2")):
        assert main(["export", str(prototxt), str(weights), "--format", "pt2", "-o", str(tmp_path / name)] + flags) == 0
    custom = {str(n.target) for n in torch.export.load(str(tmp_path / "custom.pt2")).graph.nodes}
    assert {"caffe_layers.segaware_conv.default", "caffe_layers.im2dist.default"} <= custom
    inputs = example_inputs(net, batch=2)
    with torch.no_grad():
        expected = net(**inputs)
    done, got = load_in_fresh_process(tmp_path / "custom.pt2", inputs, tmp_path, "custom")
    assert done.returncode == 0, done.stderr
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value)
    done, _ = load_in_fresh_process(tmp_path / "custom.pt2", inputs, tmp_path, "plain")
    assert done.returncode != 0 and "caffe_layers" in done.stderr
    done, got = load_in_fresh_process(tmp_path / "plain.pt2", inputs, tmp_path, "plain")
    assert done.returncode == 0 and "caffe_layers imported: False" in done.stdout, done.stderr
    for blob, value in expected.items():
        torch.testing.assert_close(got[blob], value, rtol=1e-4, atol=1e-5)
    assert main(["export", str(prototxt), "--custom-ops", "-o", str(tmp_path / "net.onnx")]) != 0  # pt2 only


DIVIDE_ARGMAX = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } } }
layer { name: "d" type: "Divide" bottom: "x" top: "y" }
layer { name: "p" type: "Power" bottom: "x" top: "p" power_param { shift: -0.5 } }
layer { name: "dg" type: "Divide" bottom: "p" top: "z" divide_param { clamp: GPU } }
layer { name: "s" type: "Eltwise" bottom: "x" bottom: "p" top: "s" }
layer { name: "top3" type: "ArgMax" bottom: "x" top: "top3" argmax_param { top_k: 3 out_max_val: true } }
layer { name: "top1" type: "ArgMax" bottom: "x" top: "top1" }
layer { name: "c1" type: "ArgMax" bottom: "x" top: "c1" argmax_param { axis: 1 out_max_val: true } }
layer { name: "w4" type: "ArgMax" bottom: "x" top: "w4" argmax_param { axis: -1 top_k: 4 } }
"""


def test_onnx_divide_and_argmax_exact(tmp_path):
    """Divide (both clamp rules; the clamped value written into its bottom, which later layers read) and ArgMax
    (top_k 1 and more, with and without axis) export; on inputs full of ties (-0.0 and 0.0 among them) and exact
    zeros onnxruntime gives our numbers bit for bit: ties to the larger index, as Caffe's partial_sort."""
    net = TorchNet(DIVIDE_ARGMAX)
    x = torch.randint(-2, 3, (2, 3, 4, 5)).float() * 0.5
    x[0, 0, 0, :3] = torch.tensor([-0.0, 0.0, -0.0])
    export_onnx(net, tmp_path / "net.onnx", {"x": x.clone()})
    with torch.no_grad():
        expected = net(x=x.clone())
    zeros = x == 0
    clamped = torch.tensor(1e-4)
    assert torch.equal(expected["s"][zeros], (clamped + (clamped - 0.5)).expand(int(zeros.sum())))  # read after the write
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert set(names) == set(expected)
    for name, got in zip(names, session.run(None, {"x": x.numpy()})):
        np.testing.assert_array_equal(got, expected[name].numpy(), err_msg=name)


SEG_ACCURACY = """
layer { name: "d" type: "Input" top: "s" top: "l" input_param { shape { dim: 2 dim: 4 dim: 3 dim: 5 }
        shape { dim: 2 dim: 1 dim: 3 dim: 5 } } }
layer { name: "acc" type: "SegAccuracy" bottom: "s" bottom: "l" top: "acc" seg_accuracy_param { ignore_label: 255 } }
"""


def test_onnx_seg_accuracy_and_its_label_check(tmp_path):
    """SegAccuracy exports (a fixed-size confusion count) with our numbers, tied scores and ignored pixels
    included; a bad label fails onnxruntime (ONNX has no assertion op) instead of being counted elsewhere."""
    net = TorchNet(SEG_ACCURACY)
    scores = torch.randint(0, 3, (2, 4, 3, 5)).float()  # many ties: the highest class wins them
    labels = torch.randint(0, 4, (2, 1, 3, 5)).float()
    labels[0, 0, 0, :4] = 255
    export_onnx(net, tmp_path / "net.onnx", {"s": scores, "l": labels})
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    feed = {"s": scores.numpy(), "l": labels.numpy()}
    np.testing.assert_array_equal(session.run(None, feed)[0], net(s=scores, l=labels)["acc"].numpy())
    compiled = torch.compile(net, fullgraph=True, backend="eager")  # the label check an assertion op, no break
    torch.testing.assert_close(compiled(s=scores, l=labels)["acc"], net(s=scores, l=labels)["acc"], rtol=0, atol=0)
    for bad in (4.0, -1.0):
        labels[1, 0, 2, 4] = bad
        with pytest.raises(ValueError, match="unexpected label"):
            net(s=scores, l=labels)
        with pytest.raises(Exception, match="ScatterElements.*out of data bounds"):
            session.run(None, {"s": scores.numpy(), "l": labels.numpy()})
