"""Fillers draw into the blob itself (no second buffer): the numbers of torch's own draws on a new tensor."""
import math

import numpy as np
import pytest
import torch

from caffe_layers import Net
from caffe_layers.formats.proto import pb
from caffe_layers.layers.fillers import fill, fill_into

SHAPE = (4, 3, 2, 2)
FAN_IN = 3 * 2 * 2


def expected(kind):
    """Caffe's rule for each kind, written with torch's primitives on a new tensor."""
    x = torch.empty(SHAPE)
    if kind == "xavier":
        return x.uniform_(-math.sqrt(3.0 / FAN_IN), math.sqrt(3.0 / FAN_IN))
    if kind == "msra":
        return x.normal_(0.0, math.sqrt(2.0 / FAN_IN))
    if kind == "gaussian_sparse":
        x.normal_(0.5, 2.0)
        return x * torch.bernoulli(torch.full(SHAPE, 2 / SHAPE[0]))
    if kind == "uniform":
        return x.uniform_(-1.5, 0.5)
    flat = torch.rand(SHAPE).reshape(SHAPE[0], -1)  # positive_unitball
    return (flat / flat.sum(1, keepdim=True)).reshape(SHAPE)


PARAMS = {"xavier": pb.FillerParameter(type="xavier"), "msra": pb.FillerParameter(type="msra"),
          "gaussian_sparse": pb.FillerParameter(type="gaussian", mean=0.5, std=2.0, sparse=2),
          "uniform": pb.FillerParameter(type="uniform", min=-1.5, max=0.5),
          "positive_unitball": pb.FillerParameter(type="positive_unitball")}


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_fill_into_draws_what_a_new_tensor_gets(kind):
    torch.manual_seed(7)
    want = expected(kind)
    for make in (lambda: fill(SHAPE, PARAMS[kind]), lambda: fill_into(torch.full(SHAPE, 9.0), PARAMS[kind])):
        torch.manual_seed(7)
        assert torch.equal(make(), want)


def test_net_blob_constants_and_zeros_are_exact():
    net = Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 2 dim: 2 } } }'
              'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
              'kernel_size: 2 weight_filler { type: "xavier" } bias_filler { type: "constant" value: -0.0 } } }'
              'layer { name: "d" type: "Convolution" bottom: "y" top: "z" convolution_param { num_output: 2 '
              'kernel_size: 1 bias_filler { type: "constant" value: 0.25 } } }'
              'layer { name: "p" type: "PReLU" bottom: "z" top: "w" }', phase="test")
    conv_w, conv_b = net.params["c"][0].data, net.params["c"][1].data
    assert conv_w.shape == SHAPE and np.abs(conv_w).max() <= math.sqrt(3.0 / FAN_IN) and conv_w.std() > 0
    assert (conv_b == 0).all() and np.signbit(conv_b).all()  # -0.0 is written, not left as +0
    assert (net.params["d"][0].data == 0).all() and not np.signbit(net.params["d"][0].data).any()  # default: 0
    assert (net.params["d"][1].data == 0.25).all()
    assert (net.params["p"][0].data == 0.25).all()  # PReLU's default slope filler


def test_net_build_draws_the_seeded_numbers():
    text = ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 2 dim: 2 } } }'
            'layer { name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 4 '
            'kernel_size: 2 weight_filler { type: "msra" } } }')
    torch.manual_seed(11)
    net = Net(text, phase="test")
    torch.manual_seed(11)
    assert np.array_equal(net.params["c"][0].data, expected("msra").numpy())
