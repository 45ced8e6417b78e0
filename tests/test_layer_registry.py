"""A net's build imports only the layer modules of its types (each type's own module, found by name)."""
import json
import subprocess
import sys

import caffe_layers
from caffe_layers.layers import layer_class, own_module


def test_every_builtin_type_is_found_in_its_own_module():
    for type_name in caffe_layers.known_types():
        cls = layer_class(type_name)
        if cls.__module__.startswith("caffe_layers.layers."):
            assert own_module(type_name) == cls.__module__, (
                f"{type_name} is registered in {cls.__module__}: name the module after the type or add it to "
                f"caffe_layers.layers._MODULE_OF")


def test_a_build_imports_only_the_modules_of_its_types():
    script = (
        "import sys, json\n"
        "from caffe_layers import Net\n"
        "Net('layer { name: \"in\" type: \"Input\" top: \"x\" top: \"label\" input_param { shape { dim: 2 dim: 3 } '\n"
        "    'shape { dim: 2 } } } layer { name: \"r\" type: \"ReLU\" bottom: \"x\" top: \"y\" }'\n"
        "    'layer { name: \"s\" type: \"SoftmaxWithLoss\" bottom: \"y\" bottom: \"label\" top: \"l\" }')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('caffe_layers.layers.'))))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    imported = set(json.loads(out))
    for module in ("input", "softmax_loss", "relu"):
        assert f"caffe_layers.layers.{module}" in imported
    assert "caffe_layers.layers.mat_read" not in imported and "caffe_layers.layers.image_data" not in imported
    assert len(imported) < len(caffe_layers.known_types()) // 2
