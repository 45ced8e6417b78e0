"""Write the SPN configs of caffe-spn (Liu et al. 2017) as prototxt next to this script.

    python models/spn/make_spn.py [OUTDIR]

voc_rnn_vgg_v3.prototxt / voc_rnn_deploy_vgg_v3.prototxt: the VOC refinement net (train / test),
reading data through spn_data.SPNDataLayer (this folder) instead of the original vocspn_datalayer.
parsing_rnn_strd2_v4.prototxt: the HELEN face-parsing net. solver_v3.prototxt: the original solver
settings. tests/test_spn.py checks each against the originals, layer for layer.
"""
import sys
from pathlib import Path

from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from caffe_layers.formats.proto import pb  # noqa: E402

HERE = Path(__file__).resolve().parent
DIRECTIONS = [("x1", True, False), ("x2", True, True), ("y1", False, False), ("y2", False, True)]
VOC_MEAN = "(104.00699, 116.66877, 122.67892)"


def layer(net, name, type_, bottom=(), top=(), **params):
    lp = net.layer.add(name=name, type=type_)
    lp.bottom.extend([bottom] if isinstance(bottom, str) else bottom)
    lp.top.extend([top] if isinstance(top, str) else top)
    for field, value in params.items():
        getattr(lp, field).CopyFrom(value)
    return lp


def specs(lp, *pairs):
    """param { lr_mult decay_mult } blocks; decay None leaves it unset."""
    for lr, decay in pairs:
        spec = lp.param.add(lr_mult=lr)
        if decay is not None:
            spec.decay_mult = decay


def conv(net, name, bottom, top, num_output, kernel, pad=None, stride=None, lr=((1, 1), (2, 0)),
         filler="xavier", type_="Convolution", loss_weight=None):
    cp = pb.ConvolutionParameter(num_output=num_output, kernel_size=[kernel])
    if pad is not None:
        cp.pad.append(pad)
    if stride is not None:
        cp.stride.append(stride)
    cp.weight_filler.type = filler
    if filler == "gaussian":
        cp.weight_filler.std = 0.02
    cp.bias_filler.type, cp.bias_filler.value = "constant", 0
    lp = layer(net, name, type_, bottom, top, convolution_param=cp)
    specs(lp, *lr)
    if loss_weight is not None:
        lp.loss_weight.append(loss_weight)
    return lp


def bilinear_upsample(net, name, bottom, top, channels):
    """Deconvolution with a fixed bilinear filter, one group per channel (VOC net's decoder)."""
    cp = pb.ConvolutionParameter(num_output=channels, kernel_size=[4], stride=[2], pad=[1], group=channels,
                                 bias_term=False)
    cp.weight_filler.type = "bilinear"
    specs(layer(net, name, "Deconvolution", bottom, top, convolution_param=cp), (0, 0))


def eltwise(net, name, bottoms, top, op):
    return layer(net, name, "Eltwise", bottoms, top,
                 eltwise_param=pb.EltwiseParameter(operation=getattr(pb.EltwiseParameter, op)))


def slice_data(net, data_channels_first=3):
    layer(net, "slice1", "Slice", "data", ["rgb", "msk"],
          slice_param=pb.SliceParameter(slice_point=[data_channels_first]))


def spn_block(net, guidance, x, channels=32):
    """Guidance (12 * channels maps) -> normalised gates; two rounds of 4-direction propagation."""
    tops = [f"gate1_{d}_g{k}" for d, _, _ in DIRECTIONS for k in (1, 2, 3)]
    layer(net, "gate_2", "Slice", guidance, tops,
          slice_param=pb.SliceParameter(slice_point=[channels * i for i in range(1, 12)]))
    for d, _, _ in DIRECTIONS:
        g = [f"gate1_{d}_g{k}" for k in (1, 2, 3)]
        for name in g:
            layer(net, f"{name}_abs", "AbsVal", name, f"{name}_abs")
        eltwise(net, f"eltwisesum_gate1_{d}", [f"{n}_abs" for n in g], f"eltwisesum_gate1_{d}", "SUM")
        layer(net, f"norm_divide_gate1_{d}", "Divide", f"eltwisesum_gate1_{d}", f"norm_divide_gate1_{d}")
        for name in g:
            eltwise(net, f"{name}_cmb", [name, f"norm_divide_gate1_{d}"], f"{name}_cmb", "PROD")
    for rnd, source in ((0, x), (1, "eltwisemax_gate1")):
        rnns = []
        for i, (d, horizontal, reverse) in enumerate(DIRECTIONS):
            name = f"gate1_rnn{4 * rnd + i + 1}"
            layer(net, name, "GateRecurrent2dnoind", [source] + [f"gate1_{d}_g{k}_cmb" for k in (1, 2, 3)], name,
                  gaterecurrent2dnoind_param=pb.GateRecurrent2dnoindParameter(horizontal=horizontal, reverse=reverse))
            rnns.append(name)
        eltwise(net, f"eltwisemax_gate{rnd + 1}", rnns, f"eltwisemax_gate{rnd + 1}", "MAX")


def voc_data_param(train):
    # the original test net also reads the train split, in a fixed order (seed 1464)
    return pb.PythonParameter(
        module="spn_data", layer="SPNDataLayer",
        param_str=f"{{'voc_dir': 'VOC2012', 'split': 'train', 'mean': {VOC_MEAN}, "
                  f"'shape': (40, 24, 128, 128), 'patch_num': 10, 'randomize': {train}, 'seed': 1464}}")


def voc_net(train=True):
    """voc_rnn_vgg_v3: VGG-16 guidance encoder, bilinear-deconvolution decoder, SPN on 21 class maps."""
    net = pb.NetParameter(name="voc_rnn_vgg_v3")
    layer(net, "data", "Python", (), ["data", "label"], python_param=voc_data_param(train))
    slice_data(net)
    conv(net, "rnn-conv1", "msk", "rnn-conv1", 32, 4, pad=1, stride=2, lr=((0.1, 1), (0.2, 0)))
    bottom = "rgb"
    vgg = [(1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512)]
    for block, n, width in vgg:
        for i in range(1, n + 1):
            name = f"conv{block}_{i}"
            # conv5_3 alone sets its bias decay_mult (0) in the original
            last = (block, i) == (5, 3)
            conv(net, name, bottom, name, width, 3, pad=1, lr=((0.1, 1), (0.2, 0 if last else None)))
            layer(net, f"relu{block}_{i}", "ReLU", name, name)
            bottom = name
        pool = pb.PoolingParameter(pool=pb.PoolingParameter.MAX, kernel_size=3, stride=2)
        layer(net, f"pool{block}", "Pooling", bottom, f"pool{block}", pooling_param=pool)
        bottom = f"pool{block}"
    conv(net, "edge_conv5", "pool5", "edge_conv5", 512, 1, stride=1)
    decoder = [(6, 512, 512, "ReLU", "conv5_3", (2, 0)), (7, 512, 512, "ReLU", "conv4_3", (1, 0)),
               (8, 512, 256, "ELU", "conv3_3", (2, 0))]
    bottom = "edge_conv5"
    for k, up_channels, width, act, skip, bias_lr in decoder:
        bilinear_upsample(net, f"edge_resize{k}_deconv", bottom, f"edge_resize{k}", up_channels)
        conv(net, f"edge_conv{k}", f"edge_resize{k}", f"edge_conv{k}", width, 3, pad=1, stride=1,
             lr=((1, 1), bias_lr))
        layer(net, f"edge_conv{k}_active", act, f"edge_conv{k}", f"edge_conv{k}")
        eltwise(net, f"concat{k}", [f"edge_conv{k}", skip], f"concat{k}", "SUM")
        bottom = f"concat{k}"
    bilinear_upsample(net, "edge_resize9_deconv", "concat8", "edge_resize9", 256)
    conv(net, "guide_conv2", "edge_resize9", "guide_conv2", 384, 3, pad=1, stride=1)
    spn_block(net, "guide_conv2", "rnn-conv1")
    bilinear_upsample(net, "elt_resize_deconv", "eltwisemax_gate2", "elt_resize", 32)
    conv(net, "rnn-conv2", "elt_resize", "rnn-conv2", 64, 3, pad=1, stride=1)
    layer(net, "rnn-conv2-relu", "ReLU", "rnn-conv2", "rnn-conv2", relu_param=pb.ReLUParameter(negative_slope=0))
    conv(net, "deconv0", "rnn-conv2", "deconv0", 21, 3, pad=1, stride=1)
    layer(net, "loss", "SoftmaxWithLoss", ["deconv0", "label"], "loss",
          loss_param=pb.LossParameter(ignore_label=255, normalize=False))
    return net


def helen_net():
    """parsing_rnn_strd2_v4: conv/BN/ELU guidance encoder, Resize decoder, SPN on 11 part maps."""
    net = pb.NetParameter(name="parsing_rnn_strd2_v4")
    shape = pb.BlobShape(dim=[40, 14, 128, 128])
    layer(net, "data", "Input", (), "data", input_param=pb.InputParameter(shape=[shape]))
    slice_data(net)
    g = dict(filler="gaussian", lr=((1, 1), (1, 0)))

    def conv_bn_elu(name, bottom, width, bn, scale, act):
        conv(net, name, bottom, name, width, 3, pad=1, stride=1, **g)
        lp = layer(net, bn, "BatchNorm", name, name, batch_norm_param=pb.BatchNormParameter(use_global_stats=False))
        specs(lp, (0, None), (0, None), (0, None))
        layer(net, scale, "Scale", name, name, scale_param=pb.ScaleParameter(bias_term=True))
        if act:
            layer(net, f"{name}_active", "ELU", name, name)

    conv(net, "conv1", "msk", "conv1", 32, 4, pad=1, stride=2, filler="gaussian")
    conv_bn_elu("edge_conv0-0", "rgb", 16, "edge_bn0-0", "edge-scale0-0", True)
    pool = pb.PoolingParameter(pool=pb.PoolingParameter.MAX, kernel_size=2, stride=2)
    layer(net, "edge_pool0-0", "Pooling", "edge_conv0-0", "edge_pool0-0", pooling_param=pool)
    bottom = "edge_pool0-0"
    for k, width in enumerate([32, 64, 128, 256, 512]):
        conv_bn_elu(f"edge_conv{k}", bottom, width, f"edge-bn{k}", f"edge-scale{k}", True)
        if k < 4:
            layer(net, f"edge_pool{k}", "Pooling", f"edge_conv{k}", f"edge_pool{k}", pooling_param=pool)
            bottom = f"edge_pool{k}"
    resize = pb.ResizeParameter(is_pyramid_test=True, out_height_scale=2, out_width_scale=2,
                                type=pb.ResizeParameter.BILINEAR)
    bottom = "edge_conv4"
    for k, width, skip in ((6, 256, "edge_conv3"), (7, 128, "edge_conv2"), (8, 64, "edge_conv1")):
        layer(net, f"edge_resize{k}", "Resize", bottom, f"edge_resize{k}", resize_param=resize)
        conv_bn_elu(f"edge_conv{k}", f"edge_resize{k}", width, f"edge-bn{k}", f"edge-scale{k}", True)
        eltwise(net, f"concat{k}", [f"edge_conv{k}", skip], f"concat{k}", "SUM")
        bottom = f"concat{k}"
    layer(net, "edge_resize9", "Resize", "concat8", "edge_resize9", resize_param=resize)
    conv_bn_elu("guide_conv2", "edge_resize9", 384, "guide-bn0", "guide-scale0", False)
    spn_block(net, "guide_conv2", "conv1")
    conv(net, "deconv1", "eltwisemax_gate2", "deconv1", 64, 4, pad=1, stride=2, filler="gaussian",
         type_="Deconvolution")
    layer(net, "deconv1-relu", "ReLU", "deconv1", "deconv1", relu_param=pb.ReLUParameter(negative_slope=0))
    conv(net, "deconv0", "deconv1", "deconv0", 11, 3, pad=1, stride=1, filler="gaussian", loss_weight=1)
    return net


def solver():
    return pb.SolverParameter(
        train_net="voc_rnn_vgg_v3.prototxt", test_net=["voc_rnn_deploy_vgg_v3.prototxt"], test_iter=[33],
        test_interval=5000000, base_lr=0.0001, momentum=0.9, weight_decay=0.005, clip_gradients=1000,
        lr_policy="poly", power=0.5, display=10, max_iter=60001, snapshot=100,
        snapshot_prefix="states/v3/state", solver_mode=pb.SolverParameter.GPU, test_initialization=False,
        device_id=1)


def configs():
    """{file name: message} of every config this script writes."""
    return {"voc_rnn_vgg_v3.prototxt": voc_net(train=True),
            "voc_rnn_deploy_vgg_v3.prototxt": voc_net(train=False),
            "parsing_rnn_strd2_v4.prototxt": helen_net(),
            "solver_v3.prototxt": solver()}


def main(outdir=HERE):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, msg in configs().items():
        header = "# generated by models/spn/make_spn.py; do not edit\n"
        (outdir / name).write_text(header + text_format.MessageToString(msg))
    return outdir


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
