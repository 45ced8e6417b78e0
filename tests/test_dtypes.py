"""float16 and bfloat16 TorchNets (net.half(), net.to(torch.bfloat16)): Caffe's -FLT_MAX sentinels in the
narrow type's range, numbers within a tolerance of float32, for a standard net, a small SPN net and every deploy
config under models/ (test_export.DEPLOY: each equal field by field to ../shared/reference's deploy configs), at
small sizes, on CPU and (where there is one) on a GPU."""
import functools

import pytest
import torch

from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.export import example_inputs
from caffe_layers.tools.reference import fill_net_hash
from golden import make_layer
from test_export import DEPLOY, SPN, STANDARD, small

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
# the largest error of each output against float32, as a fraction of that output's largest magnitude; measured
# (CPU, hashfill weights): at most 1.4e-3 in float16 and 1.6e-2 in bfloat16, spn_helen apart
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# spn_helen normalises its gates by 1 / (|g1| + |g2| + |g3|) (Divide), sums that come near 0 with hashfill
# weights: the narrow types' rounding of the sum is amplified there (measured 1.9e-2 and 1.8e-1)
LOOSER = {"spn_helen": {torch.float16: 5e-2, torch.bfloat16: 3e-1}}
NETS = {"standard": lambda: STANDARD, "spn": lambda: SPN, **DEPLOY,
        "sss": lambda: small("models/sss/sss_deploy.prototxt", {"513": "17"})}  # half test_export's size: CPU half


@functools.lru_cache(maxsize=1)  # a net's cases run one after the other: its float32 side built once
def float32_reference(name):
    """(weights, inputs, float32 outputs) of NETS[name] with hashfill weights."""
    net = TorchNet(NETS[name]())
    fill_net_hash(net)
    inputs = example_inputs(net)
    with torch.no_grad():
        return net.state_dict(), inputs, net(**inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(NETS))
def test_narrow_dtypes_match_float32(name, dtype, device):
    text = NETS[name]()
    weights, inputs, expected = float32_reference(name)
    narrow = TorchNet(text)
    narrow.load_state_dict(weights)
    narrow = narrow.half() if dtype == torch.float16 else narrow.to(dtype)
    narrow.to(device)
    with torch.no_grad():
        got = narrow(**{k: v.to(device, dtype) for k, v in inputs.items()})
    for blob, value in expected.items():
        assert got[blob].dtype == dtype
        scale = value.abs().max().item()
        err = (got[blob].float().cpu() - value).abs().max().item()
        assert err <= LOOSER.get(name, TOLERANCE)[dtype] * scale, f"{name} {blob}: {err} vs {scale}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_max_pool_sentinel_per_dtype(dtype):
    """A window with nothing above Caffe's start value gives the narrow type's -max, not an overflow."""
    x = torch.full((1, 1, 2, 2), float("-inf"), dtype=dtype)
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [x.shape], dtype=dtype)
    assert layer(x).item() == -torch.finfo(dtype).max
