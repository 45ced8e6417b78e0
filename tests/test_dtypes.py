"""float16 and bfloat16 TorchNets (net.half(), net.to(torch.bfloat16)): Caffe's -FLT_MAX sentinels in the
narrow type's range, numbers within a tolerance of float32."""
import pytest
import torch

from caffe_layers.engine.graph import TorchNet
from caffe_layers.tools.export import example_inputs
from caffe_layers.tools.reference import fill_net_hash
from golden import make_layer
from test_export import SPN, STANDARD, small

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # of each output's largest magnitude
NETS = {"standard": lambda: STANDARD, "spn": lambda: SPN,
        "embs": lambda: small("models/segaware/embs/deploy.prototxt", {"321": "41"})}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(NETS))
def test_narrow_dtypes_match_float32(name, dtype, device):
    text = NETS[name]()
    net = TorchNet(text)
    fill_net_hash(net)
    inputs = example_inputs(net)
    narrow = TorchNet(text)
    narrow.load_state_dict(net.state_dict())
    narrow = narrow.half() if dtype == torch.float16 else narrow.to(dtype)
    narrow.to(device)
    with torch.no_grad():
        expected = net(**inputs)
        got = narrow(**{k: v.to(device, dtype) for k, v in inputs.items()})
    for blob, value in expected.items():
        assert got[blob].dtype == dtype
        scale = value.abs().max().item()
        err = (got[blob].float().cpu() - value).abs().max().item()
        assert err <= TOLERANCE[dtype] * scale, f"{name} {blob}: {err} vs {scale}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_max_pool_sentinel_per_dtype(dtype):
    """A window with nothing above Caffe's start value gives the narrow type's -max, not an overflow."""
    x = torch.full((1, 1, 2, 2), float("-inf"), dtype=dtype)
    layer = make_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [x.shape], dtype=dtype)
    assert layer(x).item() == -torch.finfo(dtype).max
