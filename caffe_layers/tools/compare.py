"""`caffe-layers compare [MODEL] [WEIGHTS] --reference ref.npz|ref.h5|DIR` (or `--caffe`): layer by layer,
in net order, how far this package's tops are from reference tops.

Per top: shape, max abs error, max relative error (max abs error / max |ref|), mean abs error and cosine
similarity. A top passes when max|ours - ref| <= atol + rtol * max|ref| (the golden README's rule;
FLT_MAX/100 entries must match exactly). References holding only stats and sampled values (golden nets)
are compared on the 64 sampled values and on [sum, sqrt(sum of squares), max |x|].
Exit status: 0 all within tolerance, 1 some top over tolerance, 2 bad input.
"""
import fnmatch
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from caffe_layers.tools.dump import add_input_arguments, caffe_splits, capture, load_inputs
from caffe_layers.ops.geometry import FLT_MAX_100
from caffe_layers.tools.reference import (RefBlob, Reference, blob_samples, blob_stats, check_param_sums,
                                    fill_net_hash, load_reference)


@dataclass
class Row:
    index: int
    layer: str
    type: str
    top: str
    shape: list
    ref_shape: list = None
    kind: str = "full"        # "full" values, "sampled" values and stats, or "absent" from the reference
    max_abs: float = None
    max_rel: float = None
    mean_abs: float = None
    cosine: float = None
    bound: float = None
    ref_max: float = None
    ok: bool = True
    note: str = ""
    rtol: float = None
    atol: float = None


@dataclass
class Report:
    rows: list
    unmatched: list = field(default_factory=list)  # reference tops no layer of the net produced
    first: Row = None

    @property
    def ok(self):
        return self.first is None

    def to_json(self):
        return {"ok": self.ok, "first_divergence": asdict(self.first) if self.first else None,
                "rows": [asdict(r) for r in self.rows], "unmatched": self.unmatched}


class Tolerances:
    """Global rtol/atol with per-layer overrides: {pattern: (rtol, atol)}, fnmatch on layer or top names."""

    def __init__(self, rtol=1e-3, atol=1e-5, per_layer=None):
        self.rtol, self.atol, self.per_layer = rtol, atol, dict(per_layer or {})

    def get(self, layer, top):
        for pattern, (rtol, atol) in self.per_layer.items():
            if fnmatch.fnmatchcase(layer, pattern) or fnmatch.fnmatchcase(top, pattern):
                return (self.rtol if rtol is None else rtol), (self.atol if atol is None else atol)
        return self.rtol, self.atol

    @staticmethod
    def parse(specs, rtol, atol):
        per = {}
        for spec in specs:
            try:
                pattern, values = spec.split("=", 1)
                parts = values.split(":")
                r = float(parts[0]) if parts[0] else None
                a = float(parts[1]) if len(parts) > 1 and parts[1] else None
                if len(parts) > 2 or not pattern:
                    raise ValueError
            except ValueError:
                raise ValueError(f"--tol {spec!r}: expected LAYER=RTOL[:ATOL], e.g. conv1=1e-2 or fc8=:1e-3")
            per[pattern] = (r, a)
        return Tolerances(rtol, atol, per)


# ---- metrics ----------------------------------------------------------------------------------------------
def full_metrics(ours, ref, rtol, atol):
    """(max_abs, max_rel, mean_abs, cosine, bound, ok, note) of full values."""
    a = np.asarray(ours, np.float64).ravel()
    b = np.asarray(ref, np.float64).ravel()
    special = np.abs(b) >= FLT_MAX_100 * 0.999
    note = ""
    ok = True
    if special.any():
        if not np.array_equal(a[special], b[special]):
            ok, note = False, f"{int((a[special] != b[special]).sum())} FLT_MAX/100 entries differ"
        a, b = a[~special], b[~special]
    if not a.size:
        return 0.0, 0.0, 0.0, 1.0, atol, ok, note, 0.0
    if not np.isfinite(a).all():
        return math.inf, math.inf, math.inf, float("nan"), atol, False, "non-finite values", None
    d = np.abs(a - b)
    ref_max = float(np.abs(b).max())
    max_abs = float(d.max())
    bound = atol + rtol * ref_max
    ok = ok and max_abs <= bound
    return max_abs, _rel(max_abs, ref_max), float(d.mean()), _cosine(a, b), bound, ok, note, ref_max


def sampled_metrics(ours, ref, rtol, atol):
    """Compare on the 64 sampled values and the [sum, sqrt(sum of squares), max|x|] statistics."""
    ours = np.asarray(ours)
    n = ours.size
    mine = blob_stats(ours)
    st = np.asarray(ref.stats, np.float64)
    checks = [  # (what, ours, reference, allowed difference)
        ("sum", mine[0], st[0], n * atol + rtol * math.sqrt(n * st[1])),
        ("norm", math.sqrt(mine[1]), math.sqrt(st[1]), math.sqrt(n) * atol + rtol * math.sqrt(st[1])),
        ("max|x|", mine[2], st[2], atol + rtol * st[2]),
    ]
    bad = [f"{w} {o:.6g} vs {r:.6g}" for w, o, r, tol in checks if not abs(o - r) <= tol]
    ref_max = float(st[2])
    bound = atol + rtol * ref_max
    if ref.vals is None:
        err = abs(mine[2] - st[2])
        return err, _rel(err, ref_max), None, None, bound, not bad, "; ".join(bad), ref_max
    a = blob_samples(ours).astype(np.float64)
    b = np.asarray(ref.vals, np.float64)
    special = np.abs(b) >= FLT_MAX_100 * 0.999
    if special.any() and not np.array_equal(a[special], b[special]):
        bad.append("FLT_MAX/100 entries differ")
    a, b = a[~special], b[~special]
    if not np.isfinite(a).all():
        return math.inf, math.inf, math.inf, float("nan"), bound, False, "non-finite values", ref_max
    d = np.abs(a - b) if a.size else np.zeros(1)
    max_abs = float(d.max())
    ok = max_abs <= bound and not bad
    return max_abs, _rel(max_abs, ref_max), float(d.mean()), _cosine(a, b), bound, ok, "; ".join(bad), ref_max


def _rel(err, ref_max):
    if ref_max > 0:
        return err / ref_max
    return 0.0 if err == 0 else math.inf


def _cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


# ---- matching ---------------------------------------------------------------------------------------------
def match(entries, ref, net_param):
    """For each of our entries, its RefBlob (or None); and the reference tops nobody matched."""
    found = [None] * len(entries)
    used = set()
    if ref.by_layer:
        alias = {}
        for s in caffe_splits(net_param):
            for a in s.aliases:
                alias[a] = s.name
                for k, top in enumerate(s.tops):
                    alias[f"{a}_{k}"] = top
        index = {(e.layer, e.top): i for i, e in enumerate(entries)}
        for j, r in enumerate(ref.entries):
            key = (alias.get(r.layer, r.layer), alias.get(r.top, r.top))
            if key in index:
                found[index[key]] = r
                used.add(j)
    else:  # blob names only: final values, i.e. the last layer writing the blob
        last = {e.top: i for i, e in enumerate(entries)}
        for j, r in enumerate(ref.entries):
            if r.top in last:
                found[last[r.top]] = r
                used.add(j)
    unmatched = [f"{r.layer}:{r.top}" if r.layer else r.top for j, r in enumerate(ref.entries) if j not in used]
    return found, unmatched


def detection_rows_in_order(value):
    """[image, label, score, box] rows of a DetectionOutput top sorted by image, label, descending score."""
    rows = value.reshape(-1, value.shape[-1])
    order = np.lexsort((rows[:, 3], -rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order].reshape(value.shape)


def compare_entries(entries, ref, net_param, tolerances):
    found, unmatched = match(entries, ref, net_param)
    rows = []
    for e, r in zip(entries, found):
        rtol, atol = tolerances.get(e.layer, e.top)
        row = Row(e.index, e.layer, e.type, e.top, list(e.value.shape), rtol=rtol, atol=atol)
        if r is None:
            row.kind = "absent"
        else:
            ref_shape = tuple(r.value.shape) if r.value is not None else r.shape
            row.ref_shape = list(ref_shape) if ref_shape is not None else None
            if ref_shape is not None and tuple(ref_shape) != tuple(e.value.shape):
                if r.value is not None and r.value.size == e.value.size and not ref.by_layer:
                    r = RefBlob(r.layer, r.top, value=r.value.reshape(e.value.shape))  # e.g. .mat files are 4-D
                else:
                    row.ok, row.note = False, f"shape {list(e.value.shape)} vs reference {list(ref_shape)}"
            if row.ok:
                if r.value is not None:
                    ours_value, ref_value = e.value, r.value
                    if e.type == "DetectionOutput":  # a set of rows, ordered differently by other runtimes
                        ours_value, ref_value = detection_rows_in_order(ours_value), detection_rows_in_order(ref_value)
                    m = full_metrics(ours_value, ref_value, rtol, atol)
                else:
                    row.kind = "sampled"
                    m = sampled_metrics(e.value, r, rtol, atol)
                (row.max_abs, row.max_rel, row.mean_abs, row.cosine, row.bound, row.ok, row.note, row.ref_max) = m
        rows.append(row)
    first = next((row for row in rows if not row.ok), None)
    return Report(rows, unmatched, first)


# ---- running pycaffe ----------------------------------------------------------------------------------------
def caffe_entries(model, weights, net, inputs):
    """Every layer's tops from the original Caffe through pycaffe (which must be importable), with this
    package's parameters copied in (so hashfilled or default-filled nets agree)."""
    try:
        import caffe
    except ImportError as err:
        raise ValueError(f"--caffe: pycaffe is not importable ({err}); use --reference instead")
    from caffe_layers.tools.dump import Entry

    cnet = caffe.Net(model, weights, caffe.TEST) if weights else caffe.Net(model, caffe.TEST)
    for layer in net.layer_modules:
        if len(layer.blobs) and layer.name in cnet.params:
            for i, p in enumerate(layer.blobs):
                cnet.params[layer.name][i].data[...] = p.detach().cpu().numpy()
    for name in net.inputs:
        value = inputs[name] if name in inputs else net.blobs[name].data
        cnet.blobs[name].reshape(*value.shape)
        cnet.blobs[name].data[...] = value
    entries = []
    for i, name in enumerate(cnet._layer_names):
        cnet.forward(start=name, end=name)
        for top in cnet.top_names[name]:
            entries.append(Entry(i, name, top, np.array(cnet.blobs[top].data, copy=True)))
    return Reference([RefBlob(e.layer, e.top, value=e.value, shape=e.value.shape) for e in entries],
                     dict(inputs), {}, {}, None, True, "pycaffe")


# ---- output -----------------------------------------------------------------------------------------------
def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def format_table(report, verbose=False):
    lines = [f"{'#':>4} {'layer':<28} {'top':<24} {'shape':<18} {'max abs':>9} {'max rel':>9} "
             f"{'mean abs':>9} {'cosine':>9}  status"]
    for r in report.rows:
        if r.kind == "absent" and not verbose:
            continue
        status = "not in reference" if r.kind == "absent" else ("ok" if r.ok else "OVER TOLERANCE")
        if r.kind == "sampled":
            status += " (sampled)"
        if r is report.first:
            status = "<<< FIRST DIVERGENCE " + status
        if r.note:
            status += f"  [{r.note}]"
        shape = "x".join(str(s) for s in r.shape)
        lines.append(f"{r.index:>4} {r.layer:<28} {r.top:<24} {shape:<18} {_fmt(r.max_abs):>9} "
                     f"{_fmt(r.max_rel):>9} {_fmt(r.mean_abs):>9} {_fmt(r.cosine, '.6f'):>9}  {status}")
    return "\n".join(lines)


def summary(report):
    compared = [r for r in report.rows if r.kind != "absent"]
    bad = [r for r in compared if not r.ok]
    text = f"compared {len(compared)} tops of {len(set(r.layer for r in compared))} layers: "
    if report.ok:
        text += "all within tolerance"
    else:
        f = report.first
        text += (f"{len(bad)} over tolerance; first divergence at layer {f.layer!r} ({f.type}), top {f.top!r}: "
                 f"max abs error {_fmt(f.max_abs)} > {_fmt(f.bound)}" + (f" ({f.note})" if f.note else ""))
    if report.unmatched:
        text += f"\nwarning: {len(report.unmatched)} reference tops not produced by this net: " \
                f"{', '.join(report.unmatched[:8])}{' ...' if len(report.unmatched) > 8 else ''}"
    return text


def plot(report, entries, ref_lookup, path):
    """Error by layer (max relative error, log scale) and a heat map of the first diverging blob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r.kind != "absent"]
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2.2, 1]})
    floor = 1e-12
    xs = np.arange(len(rows))
    rel = [max(r.max_rel, floor) if r.max_rel is not None and math.isfinite(r.max_rel) else 1.0 for r in rows]
    tol = [r.bound / r.ref_max if r.ref_max else r.rtol for r in rows]
    ax.semilogy(xs, rel, ".-", label="max abs error / max |ref|")
    ax.semilogy(xs, tol, "--", color="gray", label="tolerance")
    for i, r in enumerate(rows):
        if not r.ok:
            ax.plot(i, rel[i], "o", color="red", ms=6)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r.layer}:{r.top}" if r.layer != r.top else r.layer for r in rows], rotation=90, fontsize=6)
    ax.set_title("error by layer" + (f" - first divergence: {report.first.layer}" if report.first else " - all ok"))
    ax.legend(fontsize=8)
    target = report.first or (max(rows, key=lambda r: r.max_rel or 0) if rows else None)
    if target is not None:
        ours = next(e.value for e in entries if e.layer == target.layer and e.top == target.top)
        ref = ref_lookup(target)
        if ref is not None and ref.value is not None and ref.value.size == ours.size:
            err = np.abs(ours.astype(np.float64) - ref.value.reshape(ours.shape).astype(np.float64))
            title = "|ours - ref|"
        elif ref is not None and ref.vals is not None:
            err = np.abs(blob_samples(ours).astype(np.float64) - ref.vals.astype(np.float64)).reshape(8, -1)
            title = "|ours - ref| at the 64 sampled positions"
        else:
            err = np.abs(ours.astype(np.float64))
            title = "|ours| (no reference values)"
        img = _heat_image(err)
        im = hx.imshow(img, cmap="inferno", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=hx)
        hx.set_title(f"{'first diverging' if report.first else 'largest error'}: {target.layer}:{target.top}\n{title}",
                     fontsize=9)
    else:
        hx.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heat_image(err):
    """A 2-D view: the max over channels of the first item (N x C x H x W), else the trailing 2 axes."""
    if err.ndim >= 4:
        return err.reshape(err.shape[0], err.shape[1], err.shape[2], -1)[0].max(axis=0)
    if err.ndim == 3:
        return err.max(axis=0)
    if err.ndim == 2:
        return err
    return err.reshape(1, -1)


# ---- command ----------------------------------------------------------------------------------------------
def add_arguments(parser, command):
    parser.add_argument("model", nargs="?", help="net prototxt (default: the reference's own `prototxt`)")
    parser.add_argument("weights", nargs="?",
                        help=".caffemodel (default: the reference's param: blobs, else the golden hashfill rule)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", help="ref.npz, ref.h5, or a directory of <blob>.npy / .mat files")
    src.add_argument("--caffe", action="store_true", help="run the original Caffe live through pycaffe")
    parser.add_argument("--phase", default="TEST", type=str.upper, choices=["TEST", "TRAIN"])
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3, whole nets)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    parser.add_argument("--tol", action="append", default=[], metavar="LAYER=RTOL[:ATOL]",
                        help="tolerance for layers or tops matching a glob pattern (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the comparison as JSON ('-' for stdout)")
    parser.add_argument("--plot", metavar="FILE.png", help="error by layer and a heat map of the first divergence")
    parser.add_argument("--hashfill", action="store_true",
                        help="fill parameters by the golden README's hashfill rule (the default when the reference "
                             "has paramsum: keys and no weights are given)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list tops the reference lacks")
    add_input_arguments(parser)


def prepare(args):
    """(net, entries, reference) for the arguments."""
    from caffe_layers.engine.net import Net

    model = args.model
    reference_dir = bool(args.reference) and Path(args.reference).is_dir()
    ref = None
    if args.reference and not (reference_dir and model is not None):
        ref = load_reference(args.reference)  # a directory with MODEL is read once, below, with the net
    if model is None:
        if ref is None or not ref.prototxt:
            raise ValueError("compare: give MODEL (the reference holds no prototxt)")
        model = ref.prototxt  # --caffe needs MODEL (it excludes --reference), so text never reaches pycaffe
    net = Net(model, phase=args.phase)
    if reference_dir and (ref is None or not ref.by_layer):
        ref = load_reference(args.reference, net)  # MatWrite file names need the net
    if args.weights:
        net.copy_from(args.weights)
    elif ref is not None and (args.hashfill or ref.param_sums):
        fill_net_hash(net, ref.params)
        check_param_sums(net, ref.param_sums, args.reference)
    elif ref is not None and ref.params:
        _load_params(net, ref.params, args.reference)
    elif args.hashfill:
        fill_net_hash(net)
    inputs = dict(ref.inputs) if ref is not None else {}
    inputs.update(load_inputs(args, net))
    missing = [b for b in net.inputs if b not in inputs]
    if ref is not None and missing and not ref.by_layer:
        inputs.update({b: e.value for b in missing for e in ref.entries if e.top == b})
    entries = capture(net, inputs, splits=True)
    if args.caffe:
        ref = caffe_entries(model, args.weights, net, inputs)
    return net, entries, ref


def _load_params(net, params, source):
    import torch

    with torch.no_grad():
        for layer in net.layer_modules:
            for i, p in enumerate(layer.blobs):
                key = f"{layer.name}:{i}"
                if key not in params:
                    raise ValueError(f"{source}: no param:{key} for layer {layer.name!r} (give WEIGHTS or --hashfill)")
                if tuple(params[key].shape) != tuple(p.shape):
                    raise ValueError(f"{source}: param:{key} has shape {list(params[key].shape)}, "
                                     f"layer {layer.name!r} expects {list(p.shape)}")
                p.copy_(torch.as_tensor(params[key]))


def run(args):
    try:
        tolerances = Tolerances.parse(args.tol, args.rtol, args.atol)
        net, entries, ref = prepare(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"caffe-layers compare: error: {err}", file=sys.stderr)
        return 2
    report = compare_entries(entries, ref, net.net_param, tolerances)
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON for scripts
    print(format_table(report, args.verbose), file=out)
    print(summary(report), file=out)
    if args.json:
        text = json.dumps(report.to_json(), indent=1, allow_nan=True)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.plot:
        found, _ = match(entries, ref, net.net_param)
        lookup = {(e.layer, e.top): r for e, r in zip(entries, found)}
        plot(report, entries, lambda row: lookup.get((row.layer, row.top)), args.plot)
    return 0 if report.ok else 1
