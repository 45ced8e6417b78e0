"""A net built at one input size runs at another (torch face, no reshape) and gives the numbers of a net
built at that size: layers compute everything from their inputs at call time."""
from pathlib import Path

import pytest
import torch

from caffe_layers import Net, NetSpec, layers as L, params as P

ROOT = Path(__file__).resolve().parent.parent


def spec_net(h, w):
    """Concat, Crop, Interp, Slice, Tile, Eltwise, Reshape, Flatten, Im2col, ceil and global pooling."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, h, w]))
    n.conv1 = L.Convolution(n.data, kernel_size=3, pad=1, num_output=4, weight_filler=dict(type="gaussian"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=3, stride=2, pool=P.Pooling.MAX)
    n.pool1b, n.mask = L.Pooling(n.conv1, kernel_size=3, stride=2, pad=1, pool=P.Pooling.MAX, ntop=2)
    n.ave = L.Pooling(n.conv1, kernel_size=3, stride=2, pad=1, pool=P.Pooling.AVE)
    n.up = L.Interp(n.pool1, zoom_factor=2)
    n.crop = L.Crop(n.up, n.pool1b, axis=2, offset=1)
    n.cat = L.Concat(n.crop, n.pool1b, n.ave)
    n.a, n.b = L.Slice(n.cat, slice_point=5, ntop=2)
    n.tile = L.Tile(n.b, axis=1, tiles=2)
    n.sum = L.Eltwise(n.tile, n.tile, coeff=[1, -0.5])
    n.cols = L.Im2col(n.sum, convolution_param=dict(kernel_size=3, pad=1, stride=2))
    n.glob = L.Pooling(n.cols, global_pooling=True, pool=P.Pooling.AVE)
    n.gmax = L.Pooling(n.a, global_pooling=True, pool=P.Pooling.MAX)
    n.flat = L.Flatten(n.glob)
    n.shaped = L.Reshape(n.sum, shape=dict(dim=[0, -1]))
    n.lrn = L.LRN(n.sum, local_size=3)
    return n.to_proto()


def same_at_both_sizes(make, sizes, inputs):
    """Net built at sizes[0], run at sizes[1], against a net built at sizes[1] with the same weights."""
    first, second = make(sizes[0]), make(sizes[1])
    second.load_state_dict(first.state_dict())
    x = inputs(sizes[1])
    with torch.no_grad():
        ours, ref = first(**x), second(**x)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)


def test_spec_net_at_a_new_size(tmp_path):
    def make(size):
        path = tmp_path / f"net{size[0]}x{size[1]}.prototxt"
        path.write_text(str(spec_net(*size)))
        torch.manual_seed(0)
        return Net(str(path), phase="test")

    g = torch.Generator().manual_seed(1)
    same_at_both_sizes(make, [(17, 19), (24, 13)], lambda s: {"data": torch.randn(1, 3, *s, generator=g)})


def test_embs_deploy_at_a_new_size_names_the_fixed_size_interp():
    # The original config resizes three blobs to a fixed 321 x 321 (Interp height/width), so, as in
    # Caffe, it runs only at that size; another size is one clear error naming the layer.
    net = Net(str(ROOT / "models/segaware/embs/deploy.prototxt"), phase="test")
    with torch.no_grad(), pytest.raises(ValueError, match="'fused'.*bottom 3 has shape \\[1, 128, 321, 321\\]"):
        net(image_data=torch.zeros(1, 4, 45, 45), pos_data=torch.zeros(1, 3, 13, 13))
