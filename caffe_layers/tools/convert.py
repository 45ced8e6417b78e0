"""`caffe-layers convert`: .caffemodel(.h5) <-> .pt (a torch state_dict with the net definition).

  caffe-layers convert MODEL.prototxt WEIGHTS.caffemodel -o OUT.pt
  caffe-layers convert MODEL.pt -o OUT.caffemodel        (or OUT.caffemodel.h5)

The .pt holds {"format", "net" (the V2 net prototxt text), "phase", "state_dict"}, so it alone
rebuilds the net (`load_pt`).
"""
import os

import torch
from google.protobuf import text_format

from caffe_layers.formats.proto import phase_value, pb

PT_FORMAT = "caffe_layers.engine.net/1"


def _overwrite_check(path, force):
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def save_pt(net, path):
    """Write a net's state_dict together with its definition."""
    definition = pb.NetParameter()
    definition.CopyFrom(net.net_param)
    for layer in definition.layer:
        layer.ClearField("blobs")
    definition.ClearField("state")
    torch.save({"format": PT_FORMAT, "net": text_format.MessageToString(definition),
                "phase": int(net.phase),
                "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}, path)


def read_pt(path):
    """The dict stored by save_pt, checked."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read a .pt file: {err}") from None
    if not isinstance(blob, dict) or blob.get("format") != PT_FORMAT:
        raise ValueError(f"{path}: not a caffe_layers .pt (expected a dict with format {PT_FORMAT!r}, "
                         f"as written by `caffe-layers convert`)")
    return blob


def load_pt(path):
    """Rebuild the net stored in a .pt written by save_pt / `caffe-layers convert`."""
    from caffe_layers.engine.net import Net

    blob = read_pt(path)
    definition = text_format.Parse(blob["net"], pb.NetParameter())
    net = Net(definition, phase=blob["phase"])
    net.load_state_dict(blob["state_dict"])
    return net


def _large(path):
    return os.path.getsize(path) >= 64 << 20


def convert_to_pt(prototxt, weights, out, phase="test", force=False, strict=False, progress=True):
    from caffe_layers.engine.net import Net
    from caffe_layers.formats.weights import load_weights

    _overwrite_check(out, force)
    net = Net(prototxt, phase=phase_value(phase))
    report = load_weights(net, weights, strict=strict, progress=progress and _large(weights))
    save_pt(net, out)
    return report


def convert_from_pt(pt, out, force=False, progress=False):
    from caffe_layers.formats.weights import save_weights

    _overwrite_check(out, force)
    save_weights(load_pt(pt), out, progress=progress and _large(pt))


def add_arguments(parser, command):
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="MODEL.prototxt WEIGHTS.caffemodel[.h5] (to .pt), or MODEL.pt (to .caffemodel)")
    parser.add_argument("-o", "--output", required=True, help="OUT.pt, OUT.caffemodel or OUT.caffemodel.h5")
    parser.add_argument("--phase", default="test", type=str.lower, choices=["train", "test"], help="net phase (default test)")
    parser.add_argument("--strict", action="store_true",
                        help="fail when file and net layers do not match one to one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    from caffe_layers.formats.weights import WeightsError

    try:
        if len(args.inputs) == 2:
            if not args.output.endswith(".pt"):
                raise ValueError(f"the output of MODEL.prototxt WEIGHTS -> must be a .pt, got {args.output}")
            report = convert_to_pt(args.inputs[0], args.inputs[1], args.output, args.phase, args.force,
                                   args.strict, progress=not args.no_progress)
            print(f"wrote {args.output}: {len(report.copied)} layers copied"
                  + (f"; not in the net: {report.ignored}" if report.ignored else "")
                  + (f"; not in the file: {report.missing}" if report.missing else ""))
        elif len(args.inputs) == 1 and args.inputs[0].endswith(".pt"):
            if args.output.endswith(".pt"):
                raise ValueError("converting .pt to .pt: give a .caffemodel or .caffemodel.h5 output")
            convert_from_pt(args.inputs[0], args.output, args.force, progress=not args.no_progress)
            print(f"wrote {args.output}")
        else:
            raise ValueError("expected MODEL.prototxt WEIGHTS.caffemodel -o OUT.pt, "
                             "or MODEL.pt -o OUT.caffemodel")
    except (ValueError, FileExistsError, FileNotFoundError, WeightsError) as err:
        print(f"caffe-layers convert: error: {err}")
        return 2
    return 0
