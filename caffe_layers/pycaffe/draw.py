"""pycaffe's caffe.draw (get_pydot_graph, draw_net, draw_net_to_file, get_layer_label...) and
`caffe-layers draw MODEL -o net.png|net.svg|net.dot`: the net graph as pycaffe's draw_net.py draws it.

Layers are boxes (convolutions red, pooling orange, inner products purple, others blue; in-place
one-bottom-one-top layers green), blobs grey octagons, edges labelled with num_output / batch size.
An in-place layer's top is the same blob node as its bottom (a loop), as in draw_net. The graph is
rendered by Graphviz's `dot` when it is installed, otherwise laid out and drawn with matplotlib (png,
svg, pdf, ...; '.raw' and '.dot' give the Graphviz source either way).
"""
import io
import shutil
import subprocess
import sys
from pathlib import Path

from caffe_layers.formats.proto import pb, phase_value
from caffe_layers.formats.prototxt import read_net

LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
LAYER_COLOR = "#6495ED"
NEURON_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"


def layer_included(layer, phase):
    """draw_net's filter: only include/exclude `phase` rules count (not stages or levels)."""
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise ValueError(f"draw: layer {layer.name!r} has both include and exclude rules")
    included = not len(layer.include)
    for rule in layer.include:
        included = included or rule.phase == phase
    for rule in layer.exclude:
        included = included and rule.phase != phase
    return included


def get_pooling_types_dict():
    """{PoolMethod number: name}."""
    return {v.number: k for k, v in pb.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_layer_lr_mult(layer):
    """(weight, bias) lr_mult of a Convolution, Deconvolution or InnerProduct layer (1.0 where unset)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    if len(layer.param) > 2:
        raise ValueError("Could not parse the learning rate multiplier")
    mults = [p.lr_mult for p in layer.param] + [1.0, 1.0]
    return mults[0], mults[1]


def layer_label(layer, rankdir="LR", display_lrm=False):
    sep = " " if rankdir in ("TB", "BT") else "\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        parts.append(f"({layer.type} {pb.PoolingParameter.PoolMethod.Name(layer.pooling_param.pool)})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            p = layer.pooling_param
            k, s, pad = p.kernel_size, p.stride, p.pad
        else:
            c = layer.convolution_param
            k = c.kernel_size[0] if len(c.kernel_size) else 1
            s = c.stride[0] if len(c.stride) else 1
            pad = c.pad[0] if len(c.pad) else 0
        parts.append(sep.join([f"kernel size: {k}", f"stride: {s}", f"pad: {pad}"]))
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    return sep.join(parts)


def get_layer_label(layer, rankdir, display_lrm=False):
    """pycaffe's node label: quoted, lines joined by a literal \\n for Graphviz."""
    return '"' + layer_label(layer, rankdir, display_lrm).replace("\n", r"\n") + '"'


def get_edge_label(layer):
    return edge_label(layer) or '""'


def choose_color_by_layertype(layertype):
    return LAYER_COLORS.get(layertype, LAYER_COLOR)


def edge_label(layer):
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def net_graph(net_param, phase=None, rankdir="LR", label_edges=True, style_tops=False, display_lrm=False):
    """(nodes, edges): nodes {id: dict(label, kind, color)} in first-seen order, edges [(src, dst, label)]."""
    nodes, edges = {}, []
    for layer in net_param.layer:
        if not layer_included(layer, phase):
            continue
        lid = f"{layer.name}_{layer.type}"
        in_place = len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]
        color = NEURON_COLOR if in_place else LAYER_COLORS.get(layer.type, LAYER_COLOR)
        nodes[lid] = dict(label=layer_label(layer, rankdir, display_lrm), kind="layer", color=color)
        for b in layer.bottom:
            nodes[b + "_blob"] = dict(label=b, kind="blob", color=BLOB_COLOR)
            edges.append((b + "_blob", lid, ""))
        for t in layer.top:
            # draw_net re-creates a top's node without the blob style, so a blob last seen as a top
            # (outputs, in-place results nobody reads) is a plain ellipse; `style_tops` styles them all.
            nodes[t + "_blob"] = dict(label=t, kind="blob" if style_tops else "plain", color=BLOB_COLOR)
            edges.append((lid, t + "_blob", edge_label(layer) if label_edges else ""))
    return nodes, edges


def to_dot(net_param, phase=None, rankdir="LR", label_edges=True, style_tops=False):
    nodes, edges = net_graph(net_param, phase, rankdir, label_edges, style_tops)
    q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    lines = [f"digraph {q(net_param.name or 'Net')} {{", f"  rankdir={rankdir};"]
    for nid, n in nodes.items():
        if n["kind"] == "plain":
            lines.append(f"  {q(nid)} [label={q(n['label'])}];")
            continue
        shape = "octagon" if n["kind"] == "blob" else "record"
        lines.append(f"  {q(nid)} [label={q(n['label'])}, shape={shape}, style=filled, fillcolor={q(n['color'])}];")
    for src, dst, label in edges:
        lines.append(f"  {q(src)} -> {q(dst)} [label={q(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_matplotlib(net_param, path, phase=None, rankdir="LR", style_tops=False, fmt=None, display_lrm=False):
    """A layered drawing without Graphviz: nodes ranked by longest path (in-place loops ignored).
    `path` is a file name or a binary file object (then `fmt` names the format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse, FancyBboxPatch, RegularPolygon

    nodes, edges = net_graph(net_param, phase, rankdir, style_tops=style_tops, display_lrm=display_lrm)
    rank = {n: 0 for n in nodes}
    order = list(nodes)
    position = {n: i for i, n in enumerate(order)}
    forward = [(src, dst) for src, dst, _ in edges if position[src] < position[dst]]
    for _ in range(len(order)):  # longest path over the edges that go forward in first-seen order
        changed = False
        for src, dst in forward:
            if rank[dst] < rank[src] + 1:
                rank[dst], changed = rank[src] + 1, True
        if not changed:
            break
    columns = {}
    for n in order:
        columns.setdefault(rank[n], []).append(n)
    pos = {}
    for r, members in columns.items():
        for i, n in enumerate(members):
            offset = i - (len(members) - 1) / 2
            pos[n] = (r * 2.2, -offset * 1.6) if rankdir == "LR" else (offset * 2.6, -r * 1.4)
    xs = [p[0] for p in pos.values()] or [0]
    ys = [p[1] for p in pos.values()] or [0]
    width, height = max(xs) - min(xs) + 3, max(ys) - min(ys) + 3
    fig, ax = plt.subplots(figsize=(min(max(width, 4), 300), min(max(height, 3), 300)))
    for src, dst, label in edges:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        style = "arc3,rad=0.4" if src != dst and position[src] > position[dst] else "arc3"
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", connectionstyle=style,
                                                            shrinkA=18, shrinkB=18, color="black", lw=0.8))
        if label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.1, label, fontsize=6, ha="center")
    for n, (x, y) in pos.items():
        node = nodes[n]
        if node["kind"] == "blob":
            ax.add_patch(RegularPolygon((x, y), 8, radius=0.45, facecolor=node["color"], edgecolor="black", lw=0.6))
        elif node["kind"] == "plain":
            ax.add_patch(Ellipse((x, y), 1.4, 0.8, facecolor="white", edgecolor="black", lw=0.6))
        else:
            ax.add_patch(FancyBboxPatch((x - 0.9, y - 0.45), 1.8, 0.9, boxstyle="square,pad=0",
                                        facecolor=node["color"], edgecolor="black", lw=0.6))
        ax.text(x, y, node["label"], fontsize=5.5, ha="center", va="center")
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 1.5, max(ys) + 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(net_param.name or "Net")
    dpi = min(100, 20000 / max(fig.get_size_inches()))  # big nets: at most 20000 pixels a side
    fig.savefig(path, dpi=dpi, bbox_inches="tight", format=fmt)
    plt.close(fig)


# ---- pycaffe's functions -------------------------------------------------------------------------
def get_pydot_graph(caffe_net, rankdir, label_edges=True, phase=None, display_lrm=False):
    """The NetParameter `caffe_net` as a pydot.Dot graph, node for node as pycaffe builds it."""
    import pydot

    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes, edges = net_graph(caffe_net, phase, rankdir, label_edges, display_lrm=display_lrm)
    made = {}
    for nid, n in nodes.items():
        if n["kind"] == "layer":
            label = '"' + n["label"].replace("\n", r"\n") + '"'
            made[nid] = pydot.Node(label, shape="record", style="filled", fillcolor=n["color"])
        elif n["kind"] == "blob":
            made[nid] = pydot.Node(n["label"], shape="octagon", style="filled", fillcolor=n["color"])
        else:
            made[nid] = pydot.Node(n["label"])
        graph.add_node(made[nid])
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(made[src], made[dst], label=label or '""'))
    return graph


def draw_net(caffe_net, rankdir, ext="png", phase=None, display_lrm=False):
    """The drawing of NetParameter `caffe_net` as bytes in format `ext` ('raw' or 'dot': the Graphviz
    source). Graphviz's `dot` renders it where installed; otherwise matplotlib draws it."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext in ("raw", "dot"):
        return graph.to_string().encode()
    if shutil.which("dot"):
        return graph.create(format=ext)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f"draw_net: Graphviz's `dot` is not installed, and without it format {ext!r} cannot "
                         f"be drawn (matplotlib draws {', '.join(sorted(formats))}; 'raw' gives the dot source)")
    buffer = io.BytesIO()
    render_matplotlib(caffe_net, buffer, phase, rankdir, fmt=ext, display_lrm=display_lrm)
    return buffer.getvalue()


def draw_net_to_file(caffe_net, filename, rankdir="LR", phase=None, display_lrm=False):
    """Write draw_net's drawing to `filename`, in the format its extension names ('.raw': dot source)."""
    ext = filename[filename.rfind(".") + 1:]
    image = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    with open(filename, "wb") as f:
        f.write(image)


def draw(model, path, phase=None, rankdir="LR", engine="auto", style_tops=False):
    """Draw a prototxt (path or NetParameter) to .png/.svg/.pdf/.dot; returns the engine used."""
    net_param = model if isinstance(model, pb.NetParameter) else read_net(model)
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf", "dot"):
        raise ValueError(f"draw: output {path} must end in .png, .svg, .pdf or .dot")
    if fmt == "dot":
        path.write_text(to_dot(net_param, phase, rankdir, style_tops=style_tops))
        return "dot-source"
    if engine == "auto":
        engine = "graphviz" if shutil.which("dot") else "matplotlib"
    if engine == "graphviz":
        if not shutil.which("dot"):
            raise ValueError("draw: Graphviz's `dot` is not installed (use --engine matplotlib)")
        image = subprocess.run(["dot", f"-T{fmt}"], input=to_dot(net_param, phase, rankdir, style_tops=style_tops).encode(),
                               capture_output=True, check=True).stdout
        path.write_bytes(image)
    else:
        render_matplotlib(net_param, path, phase, rankdir, style_tops)
    return engine


def add_arguments(parser, command):
    parser.add_argument("model", help="net prototxt")
    parser.add_argument("-o", "--output", required=True, help="net.png, net.svg, net.pdf or net.dot")
    parser.add_argument("--phase", default="ALL", type=str.upper, choices=["ALL", "TRAIN", "TEST"],
                        help="layers of this phase only (default ALL, as draw_net.py)")
    parser.add_argument("--rankdir", default="LR", choices=["LR", "TB", "BT", "RL"], help="graph direction")
    parser.add_argument("--engine", default="auto", choices=["auto", "graphviz", "matplotlib"],
                        help="renderer (auto: Graphviz's dot when installed)")
    parser.add_argument("--style-tops", action="store_true",
                        help="draw every blob as an octagon (draw_net leaves blobs last seen as tops plain)")


def run(args):
    phase = None if args.phase == "ALL" else phase_value(args.phase)
    try:
        engine = draw(args.model, args.output, phase, args.rankdir, args.engine, args.style_tops)
    except (ValueError, FileNotFoundError) as err:
        print(f"caffe-layers draw: error: {err}", file=sys.stderr)
        return 2
    print(f"drew {args.model} to {args.output} ({engine})")
    return 0
