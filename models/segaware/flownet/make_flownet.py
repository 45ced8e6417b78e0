"""Write the segmentation-aware FlowNetSimple of Harley et al. (ICCV 2017, section 5.2) as prototxt.

    python models/segaware/flownet/make_flownet.py [OUTDIR] [--height 384 --width 512]

FlowNetSimple (Dosovitskiy et al. 2015: conv1..conv6 with leaky ReLU 0.1, refinement by
deconvolutions down to predict_flow2 at 1/4 resolution). The segmentation-aware variant replaces the
final prediction layer (predict_flow2) by a segmentation-aware (normalised) convolution, NormConv,
guided by embeddings, and adds a 9x9 segmentation-aware bilateral filter (NormConv with fixed
uniform weights, one group per flow channel). The embeddings come from a hypercolumn of conv1..conv3.
Training: flow read by FloData, scaled by 1/20 (FlowNet's flow division), average-pooled to each
prediction's resolution, multi-scale EPELoss with FlowNet's weights. See README.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from caffe_layers.pycaffe.net_spec import NetSpec, layers as L  # noqa: E402

MSRA = dict(type="msra")
LOSS_WEIGHTS = {6: 0.32, 5: 0.08, 4: 0.02, 3: 0.01, 2: 0.005}
ENCODER = [("conv1", 64, 7, 2), ("conv2", 128, 5, 2), ("conv3", 256, 5, 2), ("conv3_1", 256, 3, 1),
           ("conv4", 512, 3, 2), ("conv4_1", 512, 3, 1), ("conv5", 512, 3, 2), ("conv5_1", 512, 3, 1),
           ("conv6", 1024, 3, 2), ("conv6_1", 1024, 3, 1)]


def conv(n, name, bottom, num_output, kernel, stride=1, relu=True):
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=kernel // 2,
                            weight_filler=MSRA, bias_filler=dict(type="constant", value=0))
    if relu:
        n[name + "_relu"] = L.ReLU(n[name], negative_slope=0.1, in_place=True)
    return n[name]


def deconv(n, name, bottom, num_output, relu=True):
    n[name] = L.Deconvolution(bottom, convolution_param=dict(num_output=num_output, kernel_size=[4], stride=[2],
                                                             pad=[1], weight_filler=MSRA))
    if relu:
        n[name + "_relu"] = L.ReLU(n[name], negative_slope=0.1, in_place=True)
    return n[name]


def make_net(height=384, width=512, train=False, segaware=True, embed_dim=64):
    if height % 64 or width % 64:
        raise ValueError(f"make_flownet: height and width must be multiples of 64, got {height}x{width}")
    n = NetSpec()
    n.img0 = L.Input(shape=dict(dim=[1, 3, height, width]))
    n.img1 = L.Input(shape=dict(dim=[1, 3, height, width]))
    n.input = L.Concat(n.img0, n.img1)
    x = n.input
    for name, ch, k, s in ENCODER:
        x = conv(n, name, x, ch, k, s)
    skips = {5: n.conv5_1, 4: n.conv4_1, 3: n.conv3_1, 2: n.conv2}
    preds = {6: conv(n, "predict_flow6", x, 2, 3, relu=False)}
    feat = x
    for lvl in (5, 4, 3, 2):
        up = deconv(n, f"deconv{lvl}", feat, {5: 512, 4: 256, 3: 128, 2: 64}[lvl])
        flow_up = deconv(n, f"upsample_flow{lvl + 1}to{lvl}", preds[lvl + 1], 2, relu=False)
        n[f"concat{lvl}"] = L.Concat(skips[lvl], up, flow_up)
        feat = n[f"concat{lvl}"]
        if lvl > 2 or not segaware:
            preds[lvl] = conv(n, f"predict_flow{lvl}", feat, 2, 3, relu=False)
    if segaware:
        # embeddings at 1/4 resolution from conv1 (1/2), conv2 (1/4) and conv3 (1/8)
        n.emb1 = L.Convolution(n.conv1, num_output=32, kernel_size=3, stride=2, pad=1, weight_filler=MSRA)
        n.emb2 = L.Convolution(n.conv2, num_output=32, kernel_size=1, weight_filler=MSRA)
        n.emb3_small = L.Convolution(n.conv3, num_output=32, kernel_size=1, weight_filler=MSRA)
        n.emb3 = L.Deconvolution(n.emb3_small, convolution_param=dict(num_output=32, kernel_size=[4], stride=[2],
                                                                      pad=[1], weight_filler=MSRA))
        n.emb_cat = L.Concat(n.emb1, n.emb2, n.emb3)
        n.emb_cat_relu = L.ReLU(n.emb_cat, in_place=True)
        n.emb = L.Convolution(n.emb_cat, num_output=embed_dim, kernel_size=1, weight_filler=MSRA)
        # segmentation-aware final prediction layer
        n.predict_flow2_sa = L.NormConv(n.concat2, n.emb, convolution_param=dict(
            num_output=2, kernel_size=[3], pad=[1], weight_filler=MSRA, bias_filler=dict(type="constant")),
            norm_conv_param=dict(norm=1, scale_filler=dict(type="constant", value=1)))  # norm: L1
        # 9x9 segmentation-aware bilateral filter: fixed uniform weights, one group per flow channel
        n.predict_flow2 = L.NormConv(n.predict_flow2_sa, n.emb, param=[dict(lr_mult=0), dict(lr_mult=1)],
                                     convolution_param=dict(num_output=2, group=2, kernel_size=[9], pad=[4],
                                                            bias_term=False,
                                                            weight_filler=dict(type="constant", value=1)),
                                     norm_conv_param=dict(norm=1, scale_filler=dict(type="constant", value=1)))
        preds[2] = n.predict_flow2
    if train:
        n.flow_gt = L.FloData(image_data_param=dict(source="flow_list.txt", batch_size=1))
        n.flow_gt_scaled = L.Power(n.flow_gt, scale=0.05)  # FlowNet trains on flow / 20
        for lvl, pred in preds.items():
            k = 2 ** lvl
            n[f"flow_gt{lvl}"] = L.Pooling(n.flow_gt_scaled, pool=1, kernel_size=k, stride=k)  # pool: AVE
            n[f"flow_loss{lvl}"] = L.EPELoss(pred, n[f"flow_gt{lvl}"], loss_weight=LOSS_WEIGHTS[lvl])
    else:
        # deploy output: flow at full resolution in pixels
        n.flow_scaled = L.Power(preds[2], scale=20.0)
        n.flow = L.Interp(n.flow_scaled, height=height, width=width)
    net = n.to_proto()
    net.name = "FlowNetS" + ("_segaware" if segaware else "") + ("_train" if train else "")
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for train in (False, True):
        name = "flownet_segaware_" + ("train" if train else "deploy") + ".prototxt"
        (out / name).write_text(str(make_net(args.height, args.width, train)))


if __name__ == "__main__":
    main()
