"""Chains of small layers (engine/tiny.py): one native call in inference, the layers' torch calls elsewhere;
the same numbers as the unchained net (to float rounding natively, exactly otherwise)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caffe_layers import NetSpec, layers as L, native, params as P
from caffe_layers.engine import tiny
from caffe_layers.engine.graph import TorchNet
from test_native import _cpu_has_avx2, _isa

FILLER = dict(type="gaussian", std=0.5)


def pnet(tmp_path):
    """MTCNN P-Net: convolutions with in-place PReLU, MAX pooling in ceil mode, two 1x1 heads, a softmax."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 12]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=10, weight_filler=FILLER, bias_filler=FILLER)
    n.prelu1 = L.PReLU(n.conv1, in_place=True, prelu_param=dict(filler=FILLER))
    n.pool1 = L.Pooling(n.prelu1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=3, num_output=16, weight_filler=FILLER, bias_filler=FILLER)
    n.prelu2 = L.PReLU(n.conv2, in_place=True, prelu_param=dict(filler=FILLER))
    n.conv3 = L.Convolution(n.prelu2, kernel_size=3, num_output=32, weight_filler=FILLER, bias_filler=FILLER)
    n.prelu3 = L.PReLU(n.conv3, in_place=True, prelu_param=dict(filler=FILLER))
    n.conv4_1 = L.Convolution(n.prelu3, kernel_size=1, num_output=2, weight_filler=FILLER, bias_filler=FILLER)
    n.conv4_2 = L.Convolution(n.prelu3, kernel_size=1, num_output=4, weight_filler=FILLER, bias_filler=FILLER)
    n.prob1 = L.Softmax(n.conv4_1)
    return _write(tmp_path, n, "pnet")


def geometry_net(tmp_path):
    """Grouped, padded, strided and dilated convolutions on wide and narrow maps; ReLUs not in place (one of them
    leaky), a convolution top read twice, padded MAX pooling, a PReLU after a pooling."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 4, 11, 9]))
    n.a = L.Convolution(n.data, kernel_size=3, pad=1, stride=2, group=2, num_output=6, weight_filler=FILLER,
                        bias_filler=FILLER)
    n.a_relu = L.ReLU(n.a, negative_slope=0.1)
    n.b = L.Convolution(n.a_relu, kernel_h=2, kernel_w=3, pad_h=2, pad_w=1, dilation=2, num_output=5,
                        weight_filler=FILLER, bias_term=False)
    n.b_relu = L.ReLU(n.b)
    n.b_also = L.Convolution(n.b, kernel_size=1, num_output=3, weight_filler=FILLER, bias_filler=FILLER)
    n.pool = L.Pooling(n.b_relu, kernel_size=3, stride=2, pad=1, pool=P.Pooling.MAX)
    n.pool_prelu = L.PReLU(n.pool, prelu_param=dict(filler=FILLER))
    n.c = L.Convolution(n.pool_prelu, kernel_size=2, num_output=7, weight_filler=FILLER, bias_filler=FILLER)
    n.prob = L.Softmax(n.c)
    return _write(tmp_path, n, "geometry")


def _write(tmp_path, n, name):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(str(n.to_proto()))
    return path


def _nets(path, **kwargs):
    torch.manual_seed(0)
    chained = TorchNet(str(path), **kwargs)
    modules = TorchNet(str(path), lower=False, **kwargs)
    modules.load_state_dict(chained.state_dict())
    return chained, modules


def _assert_same(got, want, exact=True):
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def _chain_nodes(net):
    return [n for n in net.graph.nodes if n.target is tiny.run_chain]


def _ran_natively(net, x):
    """Whether the net's chain ran its native program for x's shape (the generated code holds its own copy of
    the spec: a constant of the code)."""
    spec = _chain_nodes(net)[0].args[0]
    return any(s == spec and shape == x.shape and entry is not None and entry[2] is not None
               for (_, shape), (s, entry) in tiny._programs.items())


def test_pnet_is_one_chain_with_the_prelus_folded(tmp_path):
    net, _ = _nets(pnet(tmp_path))
    (node,) = _chain_nodes(net)
    ops, outputs = node.args[0]
    assert [op[0] for op in ops] == ["conv", "max_pool", "conv", "conv", "conv", "conv", "softmax"]
    assert [op[9] for op in ops if op[0] == "conv"] == ["prelu", "prelu", "prelu", "", ""]
    assert not any(n.op == "call_module" for n in net.graph.nodes)
    assert list(net.state_dict()) == list(TorchNet(str(pnet(tmp_path)), lower=False).state_dict())
    assert set(net(data=torch.randn(1, 3, 12, 12))) == {"conv4_2", "prob1"}


@pytest.mark.parametrize("make", [pnet, geometry_net])
def test_inference_runs_natively_with_the_unchained_numbers(tmp_path, make):
    chained, modules = _nets(make(tmp_path))
    base = chained.blob_shapes["data"]
    for shape in (base, (base[0], base[1], base[2] + 3, base[3] + 2)):  # another size than the build's
        x = torch.randn(shape)
        with torch.inference_mode():
            got, want = chained(data=x), modules(data=x)
            assert _ran_natively(chained, x)
        _assert_same(got, want, exact=False)
        with torch.no_grad(), native.disabled():  # the torch calls: exactly the modules' numbers
            got = chained(data=x)
        _assert_same(got, want)


def test_autograd_and_other_dtypes_run_the_layers_torch_calls(tmp_path):
    chained, modules = _nets(geometry_net(tmp_path))
    x = torch.randn(2, 4, 11, 9)
    got, want = chained(data=x), modules(data=x)
    _assert_same(got, want)
    (got["prob"].square().sum() + got["b_also"].sum()).backward()
    (want["prob"].square().sum() + want["b_also"].sum()).backward()
    for (name, a), (_, b) in zip(chained.named_parameters(), modules.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    chained.double(), modules.double()
    with torch.inference_mode():
        got, want = chained(data=x.double()), modules(data=x.double())
    _assert_same(got, want)


def test_large_maps_keep_torchs_convolution(tmp_path):
    chained, modules = _nets(pnet(tmp_path))
    x = torch.randn(1, 3, 120, 120)  # conv1 alone is 1.4 M multiply-adds
    with torch.inference_mode():
        got, want = chained(data=x), modules(data=x)
    assert not _ran_natively(chained, x)
    _assert_same(got, want)


def test_kept_blobs_and_outside_readers_end_the_folding(tmp_path):
    """A blob in keep_blobs is a chain output; a convolution top read by another layer keeps its ReLU apart."""
    chained, modules = _nets(geometry_net(tmp_path), keep_blobs=["a", "pool"])
    ops, outputs = _chain_nodes(chained)[0].args[0]
    convs = [op for op in ops if op[0] == "conv"]
    assert [op[9] for op in convs] == ["", "", "", ""]  # a (kept), b (read by b_also and b_relu), b_also, c
    x = torch.randn(2, 4, 11, 9)
    with torch.inference_mode():
        got, want = chained(data=x), modules(data=x)
    assert set(got) == {"a", "pool", "b_also", "prob"}
    _assert_same(got, want, exact=False)


def test_replaced_blobs_are_read(tmp_path):
    net, _ = _nets(pnet(tmp_path))
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode():
        net(data=x)
    net.conv4_2.blobs[1] = nn.Parameter(torch.full((4,), 3.0))  # new blobs at new addresses
    net.conv4_2.blobs[0] = nn.Parameter(torch.zeros(4, 32, 1, 1))
    with torch.inference_mode():
        assert torch.equal(net(data=x)["conv4_2"], torch.full((1, 4, 1, 1), 3.0))
        net.conv4_2.blobs[0] = nn.Parameter(torch.zeros(4, 32, 1, 1).to(torch.float64))
        with pytest.raises(RuntimeError):  # torch's convolution refuses the mixed dtypes, as unchained
            net(data=x)


def test_chain_program_refuses_out_of_range_indices():
    native.available("cpu")
    program = [0, 0, 1, 0, -1, -1, 0, 2, 1, 1, 1, 3, 3, 1, 1, 0, 0, 1, 1, 1, 1, 3, 3]
    native.tiny_chain_program(program, [0.0], [-1, -3], 3, 0)
    for bad in ([0, 0, 2] + program[3:], program[:3] + [5] + program[4:], [7] + program[1:]):
        with pytest.raises(ValueError, match="out of range"):
            native.tiny_chain_program(bad, [0.0], [-1, -3], 3, 0)
    with pytest.raises(ValueError, match="place"):
        native.tiny_chain_program(program, [0.0], [-1, 4], 3, 0)


def test_direct_convolution_matches_torch_on_both_loop_forms():
    """A chain of one convolution and its ReLU: the wide (>= 16 positions) and narrow loops against F.conv2d."""
    n_checked = 0
    for H, W, k, pad, stride, dilation, group in [(12, 12, 3, 0, 1, 1, 1), (5, 5, 3, 1, 2, 1, 2), (3, 3, 3, 0, 1, 1, 1),
                                                  (9, 14, 2, 2, 1, 3, 4), (1, 1, 1, 0, 1, 1, 2)]:
        x, w, b = torch.randn(2, 8, H, W), torch.randn(6 if group == 2 else 4, 8 // group, k, k), None
        if group != 4:
            b = torch.randn(w.shape[0])
        window = (k, k, pad, pad, stride, stride, dilation, dilation)
        spec = ((("conv", 0, 0, 1 if b is not None else -1, (stride,) * 2, (pad,) * 2, (dilation,) * 2, group,
                  window, "", 0.0), ("act", 1, "relu", 0.0)), (1, 2))
        blobs = (w, b) if b is not None else (w,)
        with torch.inference_mode():
            conv, relu = tiny.run_chain(spec, x, *blobs)
            assert tiny._programs[(id(spec), x.shape)][1] is not None
            n_checked += 1
        want = F.conv2d(x, w, b, stride, pad, dilation, group)
        torch.testing.assert_close(conv, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(relu, torch.relu(conv))
    assert n_checked == 5


@pytest.mark.skipif(not _cpu_has_avx2(), reason="this CPU has no AVX2: only the baseline build can run")
def test_chain_avx2_build_equals_baseline_bit_for_bit(tmp_path):
    net, _ = _nets(geometry_net(tmp_path))
    x = torch.randn(2, 4, 11, 9)
    with torch.inference_mode():
        with _isa("baseline"):
            base = net(data=x)
        with _isa("avx2"):
            avx2 = net(data=x)
    for name in base:
        assert torch.equal(base[name], avx2[name]), name


def test_no_chain_where_the_built_sizes_are_not_tiny(tmp_path):
    """A net built at sizes where a convolution is too large for the native program keeps its lowered layers."""
    path = tmp_path / "pnet64.prototxt"
    path.write_text(pnet(tmp_path).read_text().replace("dim: 12", "dim: 64"))
    chained, modules = _nets(path)
    assert not _chain_nodes(chained)
    assert not any(n.op == "call_module" for n in chained.graph.nodes)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got, want = chained(data=x), modules(data=x)
    _assert_same(got, want)
    n = NetSpec()  # no convolution: googlenet's ReLU and MAX pooling on 10 x 64 x 112 x 112
    n.data = L.Input(shape=dict(dim=[1, 8, 64, 64]))
    n.relu = L.ReLU(n.data)
    n.pool = L.Pooling(n.relu, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    assert not _chain_nodes(TorchNet(str(_write(tmp_path, n, "relu_pool"))))


def test_chained_net_compiles_fullgraph(tmp_path):
    net, modules = _nets(pnet(tmp_path))
    x = torch.randn(1, 3, 12, 12)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    with torch.inference_mode():
        got, want = compiled(data=x), modules(data=x)
    _assert_same(got, want, exact=False)
