"""`caffe-layers dump MODEL [WEIGHTS] --input data=img.png -o blobs.npz|.h5`: every layer's tops as
the layer leaves them, in net order (an in-place chain gives one entry per layer), and the parameters.

File keys: `order` = ["kkk:<layer>:<top>", ...] (kkk the layer's index), `blob:<order entry>` the
values, `in:<blob>` the inputs, `param:<layer>:<i>` the parameter blobs, `prototxt` the net.
In .h5 files each key is a dataset, '/' in names written as %2F.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caffe_layers.formats.proto import pb


@dataclass
class Entry:
    index: int   # the layer's position (counting Caffe's Split layers when they are inserted)
    layer: str
    top: str
    value: np.ndarray
    type: str = ""

    @property
    def key(self):
        return f"{self.index:03d}:{self.layer}:{self.top}"


@dataclass
class SplitInfo:
    """A Split layer Caffe's InsertSplits adds after `after` (a layer name) for `blob`."""
    after: str
    blob: str
    name: str
    tops: list
    aliases: list  # other names the same split has had (net-level inputs: "<blob>_input_<i>_split")


def caffe_splits(net_param):
    """The Split layers Caffe inserts for blobs read by several layers (util/insert_splits.cpp):
    a top counts its readers (and a non-zero explicit loss_weight) up to the next layer that writes it."""
    last_writer = {}  # blob -> (layer index, top index)
    readers = {}
    layers = list(net_param.layer)
    for i, lp in enumerate(layers):
        for b in lp.bottom:
            if b in last_writer:
                readers[last_writer[b]] = readers.get(last_writer[b], 0) + 1
        for j, t in enumerate(lp.top):
            last_writer[t] = (i, j)
        for j, w in enumerate(lp.loss_weight[:len(lp.top)]):
            if w:
                src = last_writer[lp.top[j]]
                readers[src] = readers.get(src, 0) + 1
    inputs = [t for lp in layers if lp.type == "Input" and not len(lp.bottom) for t in lp.top]
    splits = []
    for (i, j), n in sorted(readers.items()):
        if n < 2:
            continue
        lp = layers[i]
        blob = lp.top[j]
        name = f"{blob}_{lp.name}_{j}_split"
        aliases = []
        if lp.type == "Input" and not len(lp.bottom):
            # the original fork declared inputs at net level: one pseudo layer "input" for all of them
            aliases.append(f"{blob}_input_{inputs.index(blob)}_split")
        splits.append(SplitInfo(lp.name, blob, name, [f"{name}_{k}" for k in range(n)], aliases))
    return splits


def capture(net, inputs, splits=False):
    """Run `net` forward (no gradients) and return the Entry list, in net order.

    `inputs`: blob -> array or tensor (other input blobs keep their stored data).
    With `splits`, Caffe's Split layers appear as entries too (copies of their bottom).
    """
    after = {}
    if splits:
        for s in caffe_splits(net.net_param):
            after.setdefault(s.after, []).append(s)
    dtype = net._dtype()
    values = {}
    for name, value in inputs.items():
        if name not in net.blob_shapes:
            raise KeyError(f"{name!r} is not a blob of net {net.name!r}; its inputs are {net.inputs}")
        value = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value, dtype=dtype)
        if tuple(value.shape) != tuple(net.blob_shapes[name]):
            net.reshape_blob(name, value.shape)
        values[name] = value.to(net.device)
    entries = []
    index = 0
    with torch.no_grad():
        for i, step in enumerate(net.steps):
            values = net.run(values, i, i + 1)
            for top in step.tops:
                entries.append(Entry(index, step.layer.name, top, _to_numpy(values[top]), step.layer.param.type))
            index += 1
            for s in after.get(step.layer.name, []):
                for top in s.tops:
                    entries.append(Entry(index, s.name, top, entries_value(entries, s.blob), "Split"))
                index += 1
    return entries


def entries_value(entries, blob):
    for e in reversed(entries):
        if e.top == blob:
            return e.value
    raise KeyError(blob)


def _to_numpy(t):
    return t.detach().cpu().numpy().copy()


# ---- inputs ------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}


def add_input_arguments(parser):
    g = parser.add_argument_group("inputs (images are preprocessed as pycaffe's caffe.io.Transformer does)")
    g.add_argument("--input", action="append", default=[], metavar="BLOB=FILE",
                   help="an input blob from an image, .npy or .mat file (repeatable)")
    g.add_argument("--channel-swap", default="2,1,0",
                   help="channel order after HxWxC -> CxHxW (default 2,1,0: RGB to BGR; 'none' keeps RGB)")
    g.add_argument("--raw-scale", type=float, default=255.0, help="scale of the [0,1] image (default 255)")
    g.add_argument("--mean", default=None,
                   help="mean to subtract: comma-separated per-channel values, a .npy or a .binaryproto file")
    g.add_argument("--input-scale", type=float, default=None, help="scale after mean subtraction")
    g.add_argument("--gray", action="store_true", help="load images as one intensity channel")


def parse_mean(text):
    from caffe_layers.pycaffe import io

    if text is None:
        return None
    path = Path(text)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".binaryproto":
        blob = pb.BlobProto()
        blob.ParseFromString(path.read_bytes())
        mean = io.blobproto_to_array(blob)
        return mean[0] if mean.ndim == 4 else mean
    try:
        return np.array([float(v) for v in text.split(",")], dtype=np.float32)
    except ValueError:
        raise ValueError(f"--mean {text!r}: expected comma-separated numbers, a .npy or a .binaryproto file")


def load_inputs(args, net):
    """{blob: array} from the --input options."""
    from caffe_layers.pycaffe import io
    from caffe_layers.formats.matio import read_blob_mat

    out = {}
    for spec in args.input:
        if "=" not in spec:
            raise ValueError(f"--input {spec!r}: expected BLOB=FILE, e.g. data=image.png")
        name, file = spec.split("=", 1)
        if name not in net.blob_shapes:
            raise ValueError(f"--input {spec!r}: {name!r} is not a blob of the net; its inputs are {net.inputs}")
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--input {spec!r}: file not found: {path}")
        shape = tuple(net.blob_shapes[name])
        suffix = path.suffix.lower()
        if suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        elif suffix == ".mat":
            value = read_blob_mat(path, what=f"--input {name}")
        elif suffix in IMAGE_SUFFIXES:
            if len(shape) != 4:
                raise ValueError(f"--input {spec!r}: an image needs a 4-axis blob, {name!r} has shape {list(shape)}")
            t = io.Transformer({name: shape})
            t.set_transpose(name, (2, 0, 1))
            image = io.load_image(str(path), color=not args.gray)
            if image.shape[2] != shape[1]:
                raise ValueError(f"--input {spec!r}: the image has {image.shape[2]} channels, blob {name!r} "
                                 f"expects {shape[1]} (use --gray for one channel)")
            if args.channel_swap.lower() != "none" and shape[1] > 1:
                t.set_channel_swap(name, tuple(int(c) for c in args.channel_swap.split(",")))
            t.set_raw_scale(name, args.raw_scale)
            mean = parse_mean(args.mean)
            if mean is not None:
                t.set_mean(name, mean)
            if args.input_scale is not None:
                t.set_input_scale(name, args.input_scale)
            value = t.preprocess(name, image)[None]
        else:
            raise ValueError(f"--input {spec!r}: unknown file type {suffix!r} (expected an image, .npy or .mat)")
        if value.ndim == len(shape) - 1:
            value = value[None]
        out[name] = value.astype(np.float32)
    return out


def build_net(args):
    from caffe_layers.engine.net import Net

    net = Net(args.model, phase=args.phase)
    if args.weights:
        net.copy_from(args.weights)
    return net


# ---- writing -------------------------------------------------------------------------------------------
def dump_dict(net, entries, inputs):
    data = {"order": np.array([e.key for e in entries]), "prototxt": np.array(str(net.net_param))}
    for e in entries:
        data[f"blob:{e.key}"] = e.value
    for name, value in inputs.items():
        data[f"in:{name}"] = np.asarray(value)
    for layer in net.layer_modules:
        for i, p in enumerate(layer.blobs):
            data[f"param:{layer.name}:{i}"] = p.detach().cpu().numpy()
    return data


def write_dump(path, data):
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, **data)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        from caffe_layers.tools.reference import h5_name

        with h5py.File(path, "w") as f:
            for key, value in data.items():
                if value.dtype.kind == "U":
                    f.create_dataset(h5_name(key), data=value.astype(object), dtype=h5py.string_dtype())
                else:
                    f.create_dataset(h5_name(key), data=value)
    else:
        raise ValueError(f"dump: output {path} must end in .npz, .h5 or .hdf5")


def add_arguments(parser, command):
    parser.add_argument("model", help="net prototxt")
    parser.add_argument("weights", nargs="?", help=".caffemodel / .caffemodel.h5 (default: the fillers)")
    parser.add_argument("-o", "--output", required=True, help="blobs.npz or blobs.h5")
    parser.add_argument("--phase", default="TEST", type=str.upper, choices=["TEST", "TRAIN"])
    parser.add_argument("--splits", action="store_true", help="also list the Split layers Caffe would insert")
    add_input_arguments(parser)


def run(args):
    try:
        net = build_net(args)
        inputs = load_inputs(args, net)
        entries = capture(net, inputs, splits=args.splits)
        write_dump(args.output, dump_dict(net, entries, inputs))
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"caffe-layers dump: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(entries)} tops of {len(net.steps)} layers to {args.output}")
    return 0
