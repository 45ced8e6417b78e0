"""Fields of OpenCV's caffe proto on existing layers, against OpenCV dnn: PoolingParameter.ceil_mode,
DropoutParameter.scale_train (caffe-fast-rcnn), BatchNormParameter.scale_bias (NVIDIA caffe) and
fp16 BlobProto.raw_data weights (NVIDIA caffe)."""
import numpy as np
import pytest
import torch

import caffe_layers as caffe
from caffe_layers.formats.proto import pb

from golden import gradcheck_layer

cv2 = pytest.importorskip("cv2")

NET = '''input: "data" input_shape { dim: 1 dim: 3 dim: 7 dim: 7 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" batch_norm_param { use_global_stats: true scale_bias: true } }
layer { name: "drop" type: "Dropout" bottom: "bn" top: "drop" dropout_param { dropout_ratio: 0.25 scale_train: false } }
layer { name: "pool" type: "Pooling" bottom: "drop" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 ceil_mode: false } }
'''


def fp16_blob(array):
    a = np.asarray(array, np.float16)
    return pb.BlobProto(shape=pb.BlobShape(dim=a.shape), raw_data_type=pb.FLOAT16, raw_data=a.tobytes())


def test_opencv_fields_match_opencv(tmp_path):
    rng = np.random.default_rng(0)
    conv_w = rng.normal(0, 0.5, (4, 3, 3, 3))
    conv_b = rng.normal(0, 0.5, 4)
    bn = [rng.normal(0, 1, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32),
          np.array([1.0], np.float32), rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)]
    # factor 1: with scale_bias OpenCV ignores the moving-average factor blob, Caffe divides by it
    model = pb.NetParameter()
    model.layer.add(name="conv").blobs.extend([fp16_blob(conv_w), fp16_blob(conv_b)])
    model.layer.add(name="bn").blobs.extend([pb.BlobProto(shape=pb.BlobShape(dim=b.shape), data=b) for b in bn])
    path = tmp_path / "w.caffemodel"
    path.write_bytes(model.SerializeToString())
    ours = caffe.Net(NET, str(path), caffe.TEST)
    np.testing.assert_array_equal(ours.params["conv"][0].data, conv_w.astype(np.float16).astype(np.float32))
    assert len(ours.params["bn"]) == 5
    x = rng.uniform(-1, 1, (1, 3, 7, 7)).astype(np.float32)
    theirs = cv2.dnn.readNetFromCaffe(np.frombuffer(NET.encode(), np.uint8), np.frombuffer(path.read_bytes(), np.uint8))
    theirs.enableFusion(False)
    names = ["conv", "bn", "drop", "pool"]
    theirs.setInput(x, "data")
    ref = dict(zip(names, theirs.forward(names)))
    ours.forward(data=x)
    assert ours.blobs["pool"].data.shape == (1, 4, 3, 3)   # floor: ceil would give 4x4
    for name in names:
        np.testing.assert_allclose(ours.blobs[name].data, ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_dropout_scale_train_false_in_train():
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.5 scale_train: false }'
    from golden import make_layer
    layer = make_layer(text, [(1, 1000)], phase="train")
    x = torch.ones(1, 1000, dtype=torch.float64)
    y = layer(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}   # kept units are not scaled


def test_batch_norm_scale_bias_gradcheck():
    gradcheck_layer('type: "BatchNorm" batch_norm_param { use_global_stats: true scale_bias: true }',
                    [(2, 3, 2, 2)], inputs=[torch.randn(2, 3, 2, 2)])


def test_convolution_depthwise_matches_opencv():
    text = '''input: "data" input_shape { dim: 1 dim: 4 dim: 5 dim: 5 }
layer { name: "dw" type: "ConvolutionDepthwise" bottom: "data" top: "dw"
        convolution_param { num_output: 4 group: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" } } }
'''
    torch.manual_seed(0)
    net = caffe.Net(text, caffe.TEST)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 5, 5)).astype(np.float32)
    net.forward(data=x)
    weights = pb.NetParameter()
    dw = weights.layer.add(name="dw")
    for p in net.params["dw"]:
        dw.blobs.add(shape=pb.BlobShape(dim=p.data.shape), data=p.data.ravel())
    theirs = cv2.dnn.readNetFromCaffe(np.frombuffer(text.encode(), np.uint8),
                                      np.frombuffer(weights.SerializeToString(), np.uint8))
    theirs.enableFusion(False)
    theirs.setInput(x, "data")
    np.testing.assert_allclose(net.blobs["dw"].data, theirs.forward("dw"), rtol=1e-5, atol=1e-6)


def test_torch_face_does_not_fold_a_scale_bias_batch_norm():
    from caffe_layers.engine.graph import TorchNet
    text = '''input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" batch_norm_param { use_global_stats: true scale_bias: true } }
'''
    torch.manual_seed(0)
    ref = caffe.Net(text, caffe.TEST)
    with torch.no_grad():
        for blob, value in zip(ref.params["bn"], ([0.5, -1, 2], [1, 2, 0.5], [1], [2, 3, 4], [-1, 0, 1])):
            blob.data[...] = np.asarray(value, np.float32)
    weights = pb.NetParameter()
    for name in ("conv", "bn"):
        layer = weights.layer.add(name=name)
        for p in ref.params[name]:
            layer.blobs.add(shape=pb.BlobShape(dim=p.data.shape), data=p.data.ravel())
    x = np.random.default_rng(2).uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32)
    ref.forward(data=x)
    import tempfile, pathlib
    path = pathlib.Path(tempfile.mkdtemp()) / "w.caffemodel"
    path.write_bytes(weights.SerializeToString())
    net = TorchNet(text, str(path), phase="test")
    with torch.no_grad():
        out = net(data=torch.from_numpy(x))["conv"].numpy()
    np.testing.assert_allclose(out, ref.blobs["conv"].data, rtol=1e-5, atol=1e-6)
