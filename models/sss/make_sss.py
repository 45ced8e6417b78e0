"""Write the semantic feature network of Semantic Soft Segmentation (Aksoy et al. 2018) as prototxt.

    python models/sss/make_sss.py [OUTDIR] [--size 513]

Follows the released TensorFlow code (iyah4888/SIGGRAPH18SSS, deeplab_resnet/hc_deeplab.py and
model.py): a DeepLab-v2 ResNet-101 (output stride 8) with a hypercolumn of five branches (the
input / 128, pool1, res3b3_relu, res4b22_relu, res5c), each compressed by a convolution and resized
to the input size, concatenated to 1024 channels, ReLU, then a low-rank fully connected head
applied per pixel (1x1 convolutions) down to 128-d. See README.md for the differences.

sss_deploy.prototxt: image -> embedding. sss_train.prototxt: adds an instance label map and the
SSSMetricLoss. `make_net(size, blocks=...)` builds reduced-depth variants for tests.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from caffe_layers.pycaffe.net_spec import NetSpec, layers as L  # noqa: E402

RESNET101 = (3, 4, 23, 3)  # bottleneck blocks in res2..res5
BN_EPS = 0.001             # slim.batch_norm's default epsilon, which the released model used
NOBIAS = dict(bias_term=False, weight_filler=dict(type="msra"))


def block_names(stage, n):
    """DeepLab-v2 naming: res2a..c and res5a..c use letters, res3/res4 use a, b1, b2, ..."""
    if stage in (2, 5) and n <= 26:
        return [chr(ord("a") + i) for i in range(n)]
    return ["a"] + [f"b{i}" for i in range(1, n)]


def conv_bn(n, name, bottom, num_output, kernel, stride=1, pad=0, dilation=1, relu=True):
    """Convolution (no bias) + BatchNorm (global stats) + Scale, and ReLU when asked."""
    extra = dict(dilation=dilation) if dilation > 1 else {}
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                            **extra, **NOBIAS)
    bn = "bn" + name[3:] if name.startswith("res") else "bn_" + name
    sc = "scale" + name[3:] if name.startswith("res") else "scale_" + name
    n[bn] = L.BatchNorm(n[name], use_global_stats=True, eps=BN_EPS, in_place=True)
    n[sc] = L.Scale(n[bn], bias_term=True, in_place=True)
    if relu:
        n[name + "_relu"] = L.ReLU(n[sc], in_place=True)
    return n[sc]


def bottleneck(n, prefix, bottom, mid, out, stride=1, dilation=1, project=False, relu=True):
    if project:
        short = conv_bn(n, prefix + "_branch1", bottom, out, 1, stride, relu=False)
    else:
        short = bottom
    x = conv_bn(n, prefix + "_branch2a", bottom, mid, 1, stride)
    x = conv_bn(n, prefix + "_branch2b", x, mid, 3, 1, pad=dilation, dilation=dilation)
    x = conv_bn(n, prefix + "_branch2c", x, out, 1, relu=False)
    n[prefix] = L.Eltwise(short, x)
    if relu:
        n[prefix + "_relu"] = L.ReLU(n[prefix], in_place=True)
    return n[prefix]


def resnet(n, data, blocks):
    conv_bn(n, "conv1", data, 64, 7, 2, pad=3)
    # pad 1: TF 'SAME' max pooling of the released model (DeepLab's Caffe pool1 has pad 0, ceil mode)
    n.pool1 = L.Pooling(n.conv1, pool=0, kernel_size=3, stride=2, pad=1)  # pool: MAX
    x, taps = n.pool1, {}
    stages = [(2, 64, 256, 1, 1), (3, 128, 512, 2, 1), (4, 256, 1024, 1, 2), (5, 512, 2048, 1, 4)]
    for (stage, mid, out, stride, dil), count in zip(stages, blocks):
        names = block_names(stage, count)
        for i, b in enumerate(names):
            last = stage == 5 and i == len(names) - 1
            # res5c: the released hypercolumn reads it before its ReLU, and nothing else reads it
            x = bottleneck(n, f"res{stage}{b}", x, mid, out, stride if i == 0 else 1, dil, project=i == 0,
                           relu=not last)
        taps[stage] = x
    return taps


def hc_conv(n, name, bottom, num_output, kernel):
    n[name] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel, pad=kernel // 2,
                            weight_filler=dict(type="gaussian", std=0.02),
                            bias_filler=dict(type="constant", value=0))
    return n[name]


def lowrank(n, name, bottom, bottle, out):
    """lowrank_linear: x W1 W2 + b as two 1x1 convolutions (no bias, then bias)."""
    n[name + "_w1"] = L.Convolution(bottom, num_output=bottle, kernel_size=1, **NOBIAS)
    n[name] = L.Convolution(n[name + "_w1"], num_output=out, kernel_size=1, weight_filler=dict(type="msra"),
                            bias_filler=dict(type="constant", value=0.01))
    n[name + "_relu"] = L.ReLU(n[name], in_place=True)
    return n[name]


def make_net(size=513, blocks=RESNET101, train=False, feat_dim=128):
    """The NetParameter for a size x size input (BGR, mean subtracted, as the released reader)."""
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size, size]))
    taps = resnet(n, n.data, blocks)
    n.hc_in = L.Power(n.data, scale=1.0 / 128)
    branches = [hc_conv(n, "hc_cv_0", n.hc_in, 4, 1)]
    for name, src, ch, k in [("hc_cv_1", n.pool1, 124, 1), ("hc_cv_3", taps[3], 128, 1),
                             ("hc_cv_4", taps[4], 256, 3), ("hc_cv_5", taps[5], 512, 3)]:
        c = hc_conv(n, name, src, ch, k)
        n[name + "_up"] = L.Interp(c, height=size, width=size)
        branches.append(n[name + "_up"])
    n.hypercolumn = L.Concat(*branches)
    n.hypercolumn_relu = L.ReLU(n.hypercolumn, in_place=True)
    fc1 = lowrank(n, "fc1_matting", n.hypercolumn, 256, 512)
    fc2 = lowrank(n, "fc2_matting", fc1, 256, 512)
    n.fc3_input = L.Concat(fc1, fc2)
    n.embedding = L.Convolution(n.fc3_input, num_output=feat_dim, kernel_size=1, weight_filler=dict(type="msra"),
                                bias_filler=dict(type="constant", value=0.01))
    if train:
        n.label = L.Input(shape=dict(dim=[1, 1, size, size]))
        n.loss = L.SSSMetricLoss(n.embedding, n.label, num_instances=3, samples_per_instance=500)
    net = n.to_proto()
    net.name = "SSS_hypercolumn_deeplabv2" + ("_train" if train else "")
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--size", type=int, default=513)
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sss_deploy.prototxt").write_text(str(make_net(args.size)))
    (out / "sss_train.prototxt").write_text(str(make_net(args.size, train=True)))


if __name__ == "__main__":
    main()
