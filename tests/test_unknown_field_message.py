"""An unknown parameter field names the layer, its type, the file:line, and whether the type is known."""
import pytest

import caffe_layers
from caffe_layers.formats.layer_context import enclosing_layer
from caffe_layers.formats.prototxt import PrototxtError, read_net

NET = '''name: "n"
input: "data"
layer {
  name: "conv1"   # a comment with { braces }
  type: "Convolution"
  bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 1 }
}
layer {
  name: "fancy"
  type: "Fancy"
  bottom: "conv1" top: "fancy"
  fancy_param { k: 2 }
}
'''


def test_unknown_field_of_a_known_type(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET.replace("num_output: 2", "num_outputs: 2"))
    with pytest.raises(PrototxtError) as err:
        read_net(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:7:")
    assert 'has no field named "num_outputs"' in msg
    assert 'in layer "conv1" of type "Convolution" (a type caffe_layers knows' in msg


def test_unknown_field_of_an_unknown_type(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    with pytest.raises(PrototxtError) as err:
        read_net(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:13:") and 'no field named "fancy_param"' in msg
    assert 'in layer "fancy" of type "Fancy" (a type caffe_layers does not know either' in msg
    assert "Fancy" not in caffe_layers.known_types()


def test_other_parse_errors_keep_their_message():
    with pytest.raises(PrototxtError) as err:
        read_net('name: "n"\nlayer { name: "a" type: "ReLU" bottom: 3 }\n')
    assert " in layer " not in str(err.value)
    with pytest.raises(PrototxtError) as err:   # outside any layer
        read_net('name: "n"\nforce_backwards: true\n')
    assert 'no field named "force_backwards"' in str(err.value) and " in layer " not in str(err.value)


def test_enclosing_layer_finds_blocks():
    assert enclosing_layer(NET, 13) == ('"fancy"', '"Fancy"')
    assert enclosing_layer(NET, 4) == ('"conv1"', '"Convolution"')
    assert enclosing_layer(NET, 2) is None
    v1 = 'layers {\n  name: "ip"\n  type: INNER_PRODUCT\n  bad_param { }\n}\n'
    assert enclosing_layer(v1, 4) == ('"ip"', "INNER_PRODUCT")
    with pytest.raises(PrototxtError, match='in layer "ip" of type "INNER_PRODUCT" \\(while'):
        read_net(v1)
