"""`caffe-layers time --model M`: per-layer forward and backward time, as `caffe time`."""
import logging
import time

import torch

from caffe_layers.tools.train import gpu_ids, parse_set, setup_logging

log = logging.getLogger("caffe_layers.tools.timing")


def add_arguments(parser, command):
    parser.add_argument("--model", required=True, help="net .prototxt")
    parser.add_argument("--weights", default=None, help=".caffemodel(.h5) (optional)")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--phase", default="TRAIN", type=str.upper, choices=["TRAIN", "TEST"],
                        help="net phase, TRAIN (default, as caffe) or TEST")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=value")
    parser.add_argument("--gpu", default=None, help="one GPU id (default: CPU)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_net(net, iterations):
    """{layer name: (mean forward ms, mean backward ms)} and the mean whole-iteration ms.

    Every layer runs on the previous layer's outputs; backward is timed per layer by
    differentiating each layer's tops with respect to its bottoms and parameters.
    """
    device = net.device
    fwd = {s.layer.name: 0.0 for s in net.steps}
    bwd = dict(fwd)
    total = 0.0
    for _ in range(iterations):
        start_iter = time.perf_counter()
        values = {}
        records = []
        for step in net.steps:
            if step.layer.param.type == "Input" and not step.bottoms:
                values.update({t: net._blob_data(t).to(device) for t in step.tops})
                continue
            bottoms = [values[b].detach().requires_grad_(values[b].is_floating_point()) if b in values
                       else net._blob_data(b).to(device) for b in step.bottoms]
            _sync(device)
            t = time.perf_counter()
            tops = step.layer(*bottoms)
            _sync(device)
            fwd[step.layer.name] += time.perf_counter() - t
            tops = (tops,) if isinstance(tops, torch.Tensor) else tuple(tops)
            for name, value in zip(step.tops, tops):
                values[name] = value
            records.append((step, bottoms, tops))
        for step, bottoms, tops in reversed(records):
            outs = [t for t in tops if t.requires_grad]
            inputs = [b for b in bottoms if b.requires_grad] + [p for p in step.layer.blobs if p.requires_grad]
            if not outs or not inputs:
                continue
            _sync(device)
            t = time.perf_counter()
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)
            _sync(device)
            bwd[step.layer.name] += time.perf_counter() - t
        total += time.perf_counter() - start_iter
    n = max(iterations, 1)
    return {k: (fwd[k] / n * 1e3, bwd[k] / n * 1e3) for k in fwd}, total / n * 1e3


def run(args):
    setup_logging()
    from caffe_layers.pycaffe import mode
    from caffe_layers.engine.net import Net

    ids = gpu_ids(args.gpu)
    if ids:
        mode.set_mode_gpu()
        mode.set_device(ids[0])
    net = Net(args.model, args.weights, args.phase, parse_set(args.set))
    log.info("Performing Forward")
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    per_layer, per_iter = time_net(net, args.iterations)
    log.info("Average time per layer: ")
    for name, (f, b) in per_layer.items():
        log.info("%20s\tforward: %.5f ms.", name, f)
        log.info("%20s\tbackward: %.5f ms.", name, b)
    log.info("Average Forward pass: %.5f ms.", sum(f for f, _ in per_layer.values()))
    log.info("Average Backward pass: %.5f ms.", sum(b for _, b in per_layer.values()))
    log.info("Average Forward-Backward: %.5f ms.", per_iter)
    log.info("*** Benchmark ends ***")
    return 0
