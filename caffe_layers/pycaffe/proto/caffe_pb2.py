"""caffe.proto.caffe_pb2 is the generated module itself (caffe_layers.formats.caffe_pb2), not a copy:
importing this name hands back that module, so messages and enums are the very same classes."""
import sys

from caffe_layers.formats import caffe_pb2 as _generated

sys.modules[__name__] = _generated
