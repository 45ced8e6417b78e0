"""models/segaware/variables.json fills every placeholder of the original segaware templates."""
import json
from pathlib import Path

import pytest

from caffe_layers.prototxt import read_net, read_solver
from golden import REFERENCE

ROOT = Path(__file__).resolve().parents[1]


def variables(net):
    data = json.loads((ROOT / "models/segaware/variables.json").read_text())
    return {**data["common"], **data[net]}


@pytest.mark.parametrize("net", ["embs", "vgg", "res"])
def test_variables_fill_every_template(net):
    folder = REFERENCE / "segaware" / net
    files = sorted(folder.glob("*.prototxt"))
    assert files
    v = variables(net)
    for path in files:
        if path.name.startswith("solver"):
            solver = read_solver(path, v)
            assert solver.base_lr > 0, path
        else:
            param = read_net(path, v)
            assert len(param.layer) > 10, path


def test_mask_pads_follow_coverage():
    v = variables("vgg")
    for m in ("MASK", "MASK2", "MASK3"):
        size, dil = v[f"{m}_SIZE"], v[f"{m}_DILATION"]
        assert v[f"{m}_PAD"] == (size + (size - 1) * (dil - 1)) // 2
