"""Reference blobs: the golden whole-net format, the deterministic `hashfill` parameters, and the
readers the compare tool accepts (.npz, .h5, a directory of .npy/.mat files, dumps of this package).

Golden nets format (../shared/golden/README.md): `prototxt`, `in:<blob>`, `param:<layer>:<i>`,
`paramsum:<layer>:<i>` = [sum, sum of squares], `order` = ["kkk:<layer>:<top>", ...] and per entry
`shape:<key>`, `stats:<key>` = [sum, sum of squares, max |x|], `vals:<key>` = the values at flat
positions (i * 2654435761) mod size, i = 0..63; `out:<blob>` full final outputs.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import torch

HASH = 2654435761
N_SAMPLES = 64


# ---- deterministic fill ---------------------------------------------------------------------------
def hashfill(shape, seed, scale):
    """float32((((i * 2654435761 + seed * 97531) mod 2^31) / 2^31 * 2 - 1) * scale), i the flat index."""
    n = math.prod(shape)
    i = np.arange(n, dtype=np.uint64)
    v = (i * np.uint64(HASH) + np.uint64(seed * 97531)) % np.uint64(2 ** 31)
    return ((v.astype(np.float64) / 2 ** 31 * 2 - 1) * scale).astype(np.float32).reshape(shape)


def hashfill_values(layer_type, blob_index, shape, k):
    """The golden README's value for parameter blob `blob_index` of a layer, k-th blob of the net;
    None where the layer keeps its own initialisation."""
    shape = tuple(shape)
    if layer_type in ("Convolution", "InnerProduct", "Deconvolution"):
        if blob_index == 0:
            return hashfill(shape, k, math.sqrt(3.0 / math.prod(shape[1:])))
        return hashfill(shape, k, 0.1)
    if layer_type == "BatchNorm":
        if blob_index == 0:
            return hashfill(shape, k, 0.1)
        if blob_index == 1:
            return np.abs(hashfill(shape, k, 1.0)) + np.float32(0.5)
        return np.ones(shape, np.float32)
    if layer_type == "Scale":
        if blob_index == 0:
            return 1 + hashfill(shape, k, 0.1) if math.prod(shape) > 1 else None
        return hashfill(shape, k, 0.1)
    return None


def fill_net_hash(net, params=None):
    """Set a Net's parameters by the golden rule; `params` ({"layer:i": array}) take precedence."""
    params = params or {}
    k = 0
    with torch.no_grad():
        for layer in net.layer_modules:
            for i, blob in enumerate(layer.blobs):
                value = params.get(f"{layer.name}:{i}")
                if value is None:
                    value = hashfill_values(layer.param.type, i, blob.shape, k)
                if value is not None:
                    if tuple(np.shape(value)) != tuple(blob.shape):
                        raise ValueError(f"hashfill: parameter {layer.name}:{i} has shape {list(blob.shape)}, "
                                         f"the reference gives {list(np.shape(value))}")
                    blob.copy_(torch.as_tensor(np.asarray(value)))
                k += 1


def param_sums(net):
    """{"layer:i": [sum, sum of squares]} in float64, as the golden `paramsum:` keys."""
    out = {}
    for layer in net.layer_modules:
        for i, blob in enumerate(layer.blobs):
            x = blob.detach().cpu().double()
            out[f"{layer.name}:{i}"] = np.array([x.sum().item(), (x * x).sum().item()])
    return out


# ---- summaries of a blob ----------------------------------------------------------------------------
def sample_positions(size):
    return (np.arange(N_SAMPLES, dtype=np.uint64) * np.uint64(HASH)) % np.uint64(max(size, 1))


def blob_stats(x):
    """[sum, sum of squares, max |x|] in float64."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if not x.size:
        return np.zeros(3)
    return np.array([x.sum(), (x * x).sum(), np.abs(x).max()])


def blob_samples(x):
    x = np.asarray(x).ravel()
    return x[sample_positions(x.size).astype(np.int64)] if x.size else x


# ---- references ------------------------------------------------------------------------------------
@dataclass
class RefBlob:
    """One reference top: full `value`, or only `shape`, `stats` and sampled `vals`."""
    layer: str  # producing layer ("" when the reference names blobs only)
    top: str
    value: np.ndarray = None
    shape: tuple = None
    stats: np.ndarray = None
    vals: np.ndarray = None


@dataclass
class Reference:
    entries: list        # RefBlob, in the reference's order
    inputs: dict         # blob -> array
    params: dict         # "layer:i" -> array
    param_sums: dict     # "layer:i" -> [sum, sum of squares]
    prototxt: str = None
    by_layer: bool = True  # entries name (layer, top); False: blob names only (final values)
    source: str = ""


ORDER_KEY = re.compile(r"^(\d+):(.*):([^:]*)$")


def _split_order_key(key, source):
    m = ORDER_KEY.match(key)
    if not m:
        raise ValueError(f"{source}: order entry {key!r} is not 'kkk:<layer>:<top>'")
    return m.group(2), m.group(3)


def _from_mapping(z, source):
    """A Reference from a key -> array mapping (golden nets, dumps of this package, or plain blobs)."""
    keys = list(z.keys())
    get = lambda k: np.asarray(z[k])
    inputs = {k[3:]: get(k) for k in keys if k.startswith("in:")}
    params = {k[6:]: get(k) for k in keys if k.startswith("param:")}
    sums = {k[9:]: get(k) for k in keys if k.startswith("paramsum:")}
    prototxt = str(get("prototxt")) if "prototxt" in keys else None
    if "order" in keys:
        entries = []
        for key in [str(k) for k in get("order")]:
            layer, top = _split_order_key(key, source)
            if f"blob:{key}" in keys:
                value = get(f"blob:{key}")
                entries.append(RefBlob(layer, top, value=value, shape=value.shape))
            elif f"stats:{key}" in keys:
                shape = tuple(int(s) for s in get(f"shape:{key}")) if f"shape:{key}" in keys else None
                entries.append(RefBlob(layer, top, shape=shape, stats=get(f"stats:{key}"),
                                       vals=get(f"vals:{key}") if f"vals:{key}" in keys else None))
            else:
                raise ValueError(f"{source}: no values for order entry {key!r} (expected 'blob:{key}' or "
                                 f"'stats:{key}')")
        by_layer = True
        # Full final outputs (golden `out:` keys) refine the last entry writing that blob.
        for k in keys:
            if k.startswith("out:"):
                for e in reversed(entries):
                    if e.top == k[4:]:
                        e.value = get(k)
                        break
    else:
        special = ("in:", "param:", "paramsum:", "prototxt")
        entries = [RefBlob("", k[4:] if k.startswith("out:") else k, value=get(k), shape=get(k).shape)
                   for k in keys if not k.startswith(special)]
        by_layer = False
    return Reference(entries, inputs, params, sums, prototxt, by_layer, str(source))


def h5_name(key):
    """An HDF5 dataset name for a key ('/' would make groups)."""
    return quote(key, safe=":_-.+ ")


def load_reference(path, net=None):
    """Read reference blobs from .npz, .h5/.hdf5, or a directory of .npy/.mat files (one per blob;
    `<prefix><name>_blob_<i>.mat` files as MatWrite writes them map to the MatWrite layer's bottom i)."""
    path = Path(path)
    if path.is_dir():
        return _load_dir(path, net)
    if not path.is_file():
        raise FileNotFoundError(f"reference not found: {path} (expected .npz, .h5 or a directory)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return _from_mapping({k: z[k] for k in z.files}, path)
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            data = {}
            f.visititems(lambda name, obj: data.__setitem__(unquote(name), obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
        for k, v in data.items():  # strings come back as bytes
            if isinstance(v, bytes):
                data[k] = np.asarray(v.decode())
            elif isinstance(v, np.ndarray) and v.dtype.kind in "OS":
                data[k] = np.asarray([s.decode() if isinstance(s, bytes) else s for s in v.ravel()])
        return _from_mapping(data, path)
    raise ValueError(f"reference {path}: unknown format {suffix!r} (expected .npz, .h5, .hdf5 or a directory)")


def _load_dir(path, net):
    from caffe_layers.formats.matio import read_blob_mat

    mat_bottoms = []
    if net is not None:
        mat_bottoms = [s.bottoms for s in net.steps if s.layer.param.type == "MatWrite"]
    blobs = {}
    for f in sorted(path.iterdir()):
        if f.suffix == ".npy":
            value = np.load(f, allow_pickle=False)
        elif f.suffix == ".mat":
            value = read_blob_mat(f, what=f"reference {path}")
        else:
            continue
        name = unquote(f.stem)
        m = re.match(r"^(.*)_blob_(\d+)$", name)
        if net is not None and name not in net.blob_shapes and m and len(mat_bottoms) == 1:
            i = int(m.group(2))
            if i < len(mat_bottoms[0]):
                name = mat_bottoms[0][i]
        if name in blobs:
            raise ValueError(f"reference {path}: blob {name!r} given by more than one file")
        blobs[name] = value
    if not blobs:
        raise ValueError(f"reference {path}: no .npy or .mat files in the directory")
    return _from_mapping(blobs, path)


def load_golden_net(path):
    """A golden nets/*.npz file as a Reference (prototxt, inputs, params, per-layer stats)."""
    return load_reference(path)


def golden_net(path, **kwargs):
    """Build the golden file's net (its prototxt) with the hashfill parameters and its `param:` values.

    Returns (net, reference). Raises if the regenerated parameters disagree with `paramsum:`.
    """
    from caffe_layers.engine.net import Net

    ref = load_golden_net(path)
    net = Net(ref.prototxt, **kwargs)
    fill_net_hash(net, ref.params)
    check_param_sums(net, ref.param_sums, path)
    return net, ref


def check_param_sums(net, sums, source=""):
    ours = param_sums(net)
    for key, ref in sums.items():
        if key not in ours:
            raise ValueError(f"{source}: parameter {key} of the reference is not in the net")
        s, ss = ours[key]
        if abs(s - ref[0]) > 1e-3 * max(1.0, math.sqrt(abs(ref[1]))) or abs(ss - ref[1]) > 1e-4 * max(1.0, ref[1]):
            raise ValueError(f"{source}: parameter {key}: sum/sumsq {s:.6g}/{ss:.6g} do not match the "
                             f"reference's {ref[0]:.6g}/{ref[1]:.6g} (hashfill rule or weights differ)")
