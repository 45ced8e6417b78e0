"""ConvolutionDepthwise (yonghenglh6/DepthwiseConvolution, used by MobileNet Caffe ports): the
same computation as Convolution with its convolution_param (group = channels in those configs);
OpenCV dnn's importer maps the type to Convolution the same way."""
from caffe_layers.layers import register
from caffe_layers.layers.convolution import Convolution


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    pass
