"""Train the demo's embedding network and write the demo's package data.

The net is the segaware embs train config (TwoImageData -> VGG-ish trunk -> 64-d "weighted_avg"
embedding -> three Im2parity/Im2dist/DistLoss losses) trained with our Adam solver on a synthetic
set of textured colour regions (caffe_layers.training.synthetic). It writes into caffe_layers/tools/demo_data/:
  embs.caffemodel   the trained weights (the embedding layers only)
  deploy.prototxt   the embedding part of the same config with an Input "data" (mean-subtracted BGR)
  sample.png        a held-out synthetic image, and sample_labels.png its label ids

    python tools/train_demo_embs.py                 # ~10 minutes on 2 CPU cores
    python tools/train_demo_embs.py --iters 50 --out /tmp/x   # a quick try

The config is models/segaware/embs/train.prototxt when that file exists, else the original template
(../shared/reference/segaware/embs/train.prototxt, or --config); its ${VAR}s come from
models/segaware/variables.json with this run's data, crop and batch size on top.
"""
import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from google.protobuf import text_format
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caffe_layers.training import synthetic  # noqa: E402
from caffe_layers.formats.proto import pb  # noqa: E402
from caffe_layers.formats.prototxt import read_net  # noqa: E402

CONFIGS = [ROOT / "models/segaware/embs/train.prototxt",
           ROOT.parent / "shared/reference/segaware/embs/train.prototxt"]
VARIABLES = ROOT / "models/segaware/variables.json"
DEMO_DATA = ROOT / "caffe_layers/tools/demo_data"
EMBEDDING_TOP = "weighted_avg"
SAMPLE_SEED, SAMPLE_SIZE = 1_000_003, 160  # held out: training seeds are 0..count-1


def find_config(given=None):
    for path in ([Path(given)] if given else CONFIGS):
        if path.is_file():
            return path
    raise SystemExit(f"no embs train config found (tried {', '.join(map(str, CONFIGS))}); pass --config")


def embs_variables(data_root, crop, batch=1, train_set="train"):
    """${VAR} values for the embs train template: models/segaware/variables.json ("common", then "embs";
    mask sizes 3 with dilations 1, 2, 5 and pads coverage // 2, not the original driver's pad bug),
    with the data, crop and batch of this run on top."""
    if not VARIABLES.is_file():
        raise SystemExit(f"{VARIABLES} is missing (it holds the embs config's variable values)")
    blocks = json.loads(VARIABLES.read_text())
    v = dict(blocks["common"], **blocks["embs"])
    v.update({"NET_ID": "embs_synthetic", "DATA_ROOT": f"{data_root}/", "EXP": str(data_root),
              "TRAIN_SET": train_set, "BATCH_SIZE": batch, "CROP_SIZE": crop})
    return v


def solver_param(config, base_lr, max_iter, seed=1, display=50, steps=()):
    """Adam as the embs solver; `steps` (iterations) make it multistep with gamma 0.1, which lets the
    embedding settle to the small scale the DistLoss margins (0.5 / 2) ask for."""
    s = pb.SolverParameter()
    s.train_net = str(config)
    s.type = "Adam"
    s.base_lr = base_lr
    s.lr_policy = "multistep" if steps else "fixed"
    if steps:
        s.stepvalue.extend(int(v) for v in steps)
        s.gamma = 0.1
    s.max_iter = max_iter
    s.display = display
    s.random_seed = seed
    s.snapshot_after_train = False  # the tool saves the embedding layers itself
    return s


def deploy_net(config, variables, size):
    """The embedding part of the train config (up to EMBEDDING_TOP) on an Input "data" of 1x3xSxS."""
    train = read_net(config, dict(variables, CROP_SIZE=size))
    net = pb.NetParameter(name=train.name + "_deploy")
    inp = net.layer.add(name="data", type="Input")
    inp.top.append("data")
    inp.input_param.shape.add(dim=[1, 3, size, size])
    needed = {"data"}
    for lp in train.layer:
        if lp.type == "TwoImageData" or not all(b in needed for b in lp.bottom):
            continue
        keep = net.layer.add()
        keep.CopyFrom(lp)
        keep.ClearField("include")
        needed.update(lp.top)
        if EMBEDDING_TOP in lp.top:
            break
    return net


def embedding_layer_names(deploy):
    return {lp.name for lp in deploy.layer}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="embs train.prototxt (template)")
    ap.add_argument("--out", default=str(DEMO_DATA), help="where the demo data goes")
    ap.add_argument("--iters", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--count", type=int, default=200, help="synthetic training images")
    ap.add_argument("--size", type=int, default=97, help="synthetic image size")
    ap.add_argument("--crop", type=int, default=65)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", help="a .solverstate of an earlier run to continue from")
    ap.add_argument("--snapshot", type=int, default=0, help="also snapshot every N iterations (into OUT/snapshots)")
    ap.add_argument("--steps", default="0.6,0.9", help="lr x0.1 at these fractions of --iters ('' for fixed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    from caffe_layers.engine.net import Net
    from caffe_layers.training.solver import Solver
    from caffe_layers.formats.weights import save_weights

    config = find_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_voc(tmp, args.count, args.size, args.size, seed=0)
        variables = embs_variables(tmp, args.crop)
        steps = [round(float(f) * args.iters) for f in args.steps.split(",") if f.strip()]
        param = solver_param(config, args.lr, args.iters, steps=steps)
        if args.snapshot:
            (out / "snapshots").mkdir(exist_ok=True)
            param.snapshot, param.snapshot_prefix = args.snapshot, str(out / "snapshots" / "embs")
        solver = Solver(param, variables)
        solver.solve(args.resume)
        deploy = deploy_net(config, variables, SAMPLE_SIZE)
        (out / "deploy.prototxt").write_text(
            "# generated by tools/train_demo_embs.py from the segaware embs train config\n"
            + text_format.MessageToString(deploy))
        net = Net(str(out / "deploy.prototxt"))
        net.load_state_dict({k: v for k, v in solver.net.state_dict().items()
                             if k.split(".")[0] in embedding_layer_names(deploy)})
        save_weights(net, out / "embs.caffemodel")
    image, labels = synthetic.make_sample(SAMPLE_SEED, SAMPLE_SIZE, SAMPLE_SIZE, regions=(5, 8))
    Image.fromarray(image, "RGB").save(out / "sample.png")
    Image.fromarray(labels, "L").save(out / "sample_labels.png")
    logging.info("wrote %s in %.0f s (config %s)", out, time.time() - start, config)


if __name__ == "__main__":
    main()
