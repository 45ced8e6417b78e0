"""caffe_layers: Caffe nets (BVLC, DeepLab, segaware, SPN layers) in PyTorch.

`import caffe_layers as caffe` gives the pycaffe interface: caffe.Net(proto, weights, caffe.TEST),
caffe.set_mode_gpu(), net.blobs / net.params / net.forward / net.backward.
"""
from caffe_layers.layers import known_types, register as register_layer
from caffe_layers.layers.base import Layer
from caffe_layers.pycaffe.mode import set_device, set_mode_cpu, set_mode_gpu
from caffe_layers.engine.net import Net
from caffe_layers.pycaffe.net_spec import NetSpec, layers, params, to_proto  # pycaffe's caffe.layers / caffe.params
from caffe_layers.formats.proto import TEST, TRAIN
from caffe_layers.pycaffe import io  # pycaffe's caffe.io (Transformer, load_image, blobproto_to_array)

__all__ = ["Net", "Layer", "register_layer", "known_types", "TRAIN", "TEST",
           "set_mode_cpu", "set_mode_gpu", "set_device",
           "NetSpec", "layers", "params", "to_proto", "io"]
