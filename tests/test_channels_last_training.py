"""TRAIN-phase Convolution and MAX Pooling handing their tops on channels-last (plan.mark_channels_last):
which layers do, and that values and gradients are those of the plain layout."""
import pytest
import torch
import torch.nn.functional as F

from caffe_layers import Net
from caffe_layers.formats.proto import TEST, TRAIN
from caffe_layers.layers import convolution, pooling
from golden import make_layer

FLT_MAX = torch.finfo(torch.float32).max


def lenet(relu_after_conv1=False):
    """LeNet's layers (lenet_train_test.prototxt) on Input blobs of a small batch."""
    relu = ('layer { name: "relu0" type: "ReLU" bottom: "conv1" top: "conv1" }' if relu_after_conv1 else "")
    return f"""
    layer {{ name: "data" type: "Input" top: "data" top: "label"
             input_param {{ shape {{ dim: 4 dim: 1 dim: 28 dim: 28 }} shape {{ dim: 4 }} }} }}
    layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
             convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }}
                                  bias_filler {{ type: "gaussian" }} }} }}
    {relu}
    layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
             pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
    layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
             convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }}
                                  bias_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
             pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
    layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
             inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
    layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
             inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
    """


def kept(net):
    """The layers whose lowered form hands the top on channels-last."""
    names = []
    for step in net.steps:
        lowered = getattr(step.layer, "lowered", lambda: None)()
        if lowered and (lowered[0] is pooling.caffe_max_pool_channels_last
                        or lowered[0] is convolution.train_conv2d and lowered[1][-1] is True):
            names.append(step.layer.name)
    return names


def test_lenet_keeps_channels_last_from_conv1_to_conv2():
    """conv1, pool1 and conv2 hand their tops to layers that take channels-last; pool2's reader is an
    InnerProduct, a ReLU written in place takes the plain layout, and a TEST net keeps it everywhere."""
    assert kept(Net(lenet(), phase=TRAIN)) == ["conv1", "pool1", "conv2"]
    assert kept(Net(lenet(relu_after_conv1=True), phase=TRAIN)) == ["pool1", "conv2"]
    assert kept(Net(lenet(), phase=TEST)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lenet_channels_last_training_equals_plain_autograd(dtype):
    """A TRAIN forward and backward through the channels-last chain gives the loss and the parameter diffs of
    torch's plain-layout autograd of the same functions (float64: to 1e-12; float32: to float rounding), and
    the blobs it leaves are in the plain layout."""
    torch.manual_seed(0)
    net = Net(lenet(), phase=TRAIN).to(dtype)
    x = torch.rand(4, 1, 28, 28, dtype=dtype)
    label = torch.tensor([3.0, 0.0, 9.0, 5.0], dtype=dtype)
    values = net.run({"data": x, "label": label})
    assert values["conv1"].is_contiguous(memory_format=torch.channels_last)
    values["loss"].backward()
    w = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    h = F.max_pool2d(F.conv2d(x, w[0], w[1]), 2, 2)
    h = F.max_pool2d(F.conv2d(h, w[2], w[3]), 2, 2)
    h = F.linear(F.relu(F.linear(h.flatten(1), w[4], w[5])), w[6], w[7])
    loss = F.cross_entropy(h, label.long())
    loss.backward()
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(values["loss"], loss, rtol=0, atol=atol)
    for p, ref in zip(net.parameters(), w):
        torch.testing.assert_close(p.grad, ref.grad, rtol=0, atol=atol * ref.grad.abs().max().item())
    net.store_values(values)
    assert all(net._blob_data(b).is_contiguous() for b in net.blob_shapes)


def test_lenet_channels_last_solver_steps_equal_plain_layout():
    """Solver iterations through the channels-last chain follow those of the same net whose layers keep the
    plain layout (the diffs agree to float rounding, so the weights after 3 SGD steps to 1e-5 of their size)."""
    from caffe_layers.training.solver import Solver

    def solver(plain):
        torch.manual_seed(0)
        s = Solver('base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed" max_iter: 3 '
                   f'net_param {{ {lenet()} }}')
        if plain:
            for layer in s.net.layer_modules:
                if getattr(layer, "takes_channels_last", False):
                    layer.takes_channels_last = False
                    if isinstance(layer, convolution.Convolution):
                        layer._plain_args = layer._plain_args[:-1] + (False,)
                    elif layer._lowered[0] is pooling.caffe_max_pool_channels_last:
                        layer._lowered = (pooling.caffe_max_pool, layer._lowered[1])
            assert kept(s.net) == []
        else:
            assert kept(s.net) == ["conv1", "pool1", "conv2"]
        torch.manual_seed(1)
        data = torch.rand(4, 1, 28, 28)
        s.net._blob_data("data").copy_(data)
        s.net._blob_data("label").copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        s.step(3)
        return s

    ours, plain = solver(False), solver(True)
    for a, b in zip(ours.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def _awkward_values(shape, dtype):
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).to(dtype)
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[::53] = float("nan")
    x.view(-1)[::31] = -FLT_MAX
    x[0, 0] = float("-inf")
    return x


@pytest.mark.parametrize("channels_last_in", [False, True])
@pytest.mark.parametrize("channels_last_top", [False, True])
@pytest.mark.parametrize("settings", [(2, 2, 0), (3, 2, 1)])
def test_max_pool_layouts_give_torchs_values_and_gradients_exactly(channels_last_in, channels_last_top, settings):
    """_MaskedMaxPool in every layout combination: torch's max_pool2d(...).clamp_min(-FLT_MAX) values and
    autograd exactly (ties, -inf, NaN), the top in the layout asked for, the diff in the bottom's."""
    kernel, stride, pad = settings
    x = _awkward_values((2, 20, 9, 10), torch.float32)
    theirs = x.clone().requires_grad_(True)
    ours = (x.contiguous(memory_format=torch.channels_last) if channels_last_in else x.clone()).requires_grad_(True)
    top = pooling._MaskedMaxPool.apply(ours, (kernel,) * 2, (stride,) * 2, (pad,) * 2, False, channels_last_top)
    ref = F.max_pool2d(theirs, kernel, stride, pad).clamp_min(-FLT_MAX)
    torch.testing.assert_close(top, ref, rtol=0, atol=0, equal_nan=True)
    assert top.is_contiguous(memory_format=torch.channels_last if channels_last_top else torch.contiguous_format)
    grad = torch.randn(top.shape)
    top.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
    assert ours.grad.is_contiguous(memory_format=torch.channels_last if channels_last_in else torch.contiguous_format)


def test_max_pool_channels_last_gradcheck():
    x = torch.randn(1, 9, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: pooling.caffe_max_pool_channels_last(
        t, (3, 3), (2, 2), (1, 1), False, (1, 1), "p"), (x,), fast_mode=True)


@pytest.mark.parametrize("channels,channels_last_in", [(1, False), (10, True), (10, False)])
def test_train_conv_channels_last_top_gradcheck_and_layouts(channels, channels_last_in):
    """_ChannelsLastConv2d with a channels-last top (one channel: the bottom restrided, no copy): float64
    gradcheck, the top channels-last, the bottom's gradient in its own layout."""
    torch.manual_seed(0)
    x = torch.randn(1, channels, 4, 5, dtype=torch.float64)
    if channels_last_in:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(3, channels, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    args = (1, 1, 1, 1, True)  # stride, pad, dilation, group, channels_last_top
    assert torch.autograd.gradcheck(lambda *t: convolution.train_conv2d(*t, *args), (x, w, b), fast_mode=True)
    top = convolution.train_conv2d(x, w, b, *args)
    assert top.is_contiguous(memory_format=torch.channels_last) and top.stride(1) == 1
    top.backward(torch.randn(top.shape, dtype=torch.float64))
    assert x.grad.is_contiguous(memory_format=torch.channels_last if channels_last_in else torch.contiguous_format)
    assert w.grad.is_contiguous()


def test_one_channel_train_conv_without_channels_last_top_is_torchs():
    """A one-channel TRAIN convolution whose top goes to a layer that does not take channels-last runs torch's
    own path: F.conv2d's values bitwise, in the plain layout."""
    layer = make_layer('type: "Convolution" convolution_param { num_output: 20 kernel_size: 5 '
                       'weight_filler { type: "gaussian" } }', [(2, 1, 12, 12)], phase="train", dtype=torch.float32)
    assert layer.lowered()[0] is convolution.train_conv2d and layer.lowered()[1][-1] is False
    x = torch.randn(2, 1, 12, 12)
    weight = layer.blobs[0]
    top = layer(x)
    torch.testing.assert_close(top, F.conv2d(x, weight, layer.blobs[1]), rtol=0, atol=0)
    assert top.is_contiguous()


def test_pycaffe_forward_backward_through_the_channels_last_layers():
    """pycaffe's forward and backward (each layer on the stored blobs, which stay in the plain layout) give the
    parameter diffs of a run through the channels-last chain."""
    torch.manual_seed(0)
    net = Net(lenet(), phase=TRAIN).to(torch.float64)
    x, label = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([3.0, 0.0, 9.0, 5.0], dtype=torch.float64)
    net.run({"data": x, "label": label})["loss"].backward()
    chained = [p.grad.clone() for p in net.parameters()]
    net.clear_param_diffs()
    net.blobs["data"].data[...] = x.numpy()
    net.blobs["label"].data[...] = label.numpy()
    net.forward()
    net.backward()
    assert all(net._blob_data(b).is_contiguous() and net._blob_diff(b).is_contiguous() for b in net.blob_shapes)
    for p, want in zip(net.parameters(), chained):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-12 * want.abs().max().item())


def test_torch_face_hands_kept_channels_last_blobs_plain():
    """A TorchNet TRAIN net keeps its channels-last chain, but a blob the caller asked for (keep_blobs) comes
    back in the plain layout with the chain's values."""
    from caffe_layers import TorchNet
    torch.manual_seed(0)
    net = TorchNet(lenet(), phase=TRAIN, keep_blobs=["conv1", "pool1"])
    assert sorted(n for n, m in net.named_modules() if getattr(m, "hands_channels_last", False)) == [
        "conv1", "conv2", "pool1"]
    x, label = torch.rand(4, 1, 28, 28), torch.tensor([3.0, 0.0, 9.0, 5.0])
    out = net(data=x, label=label)
    assert out["conv1"].is_contiguous() and out["pool1"].is_contiguous()
    conv1 = F.conv2d(x, net.state_dict()["conv1.0"], net.state_dict()["conv1.1"])
    torch.testing.assert_close(out["conv1"], conv1)
    torch.testing.assert_close(out["pool1"], F.max_pool2d(conv1, 2, 2))
    out["loss"].backward()
