"""`caffe-layers train` and `caffe-layers test`, as Caffe's tools/caffe.cpp.

train: --solver S [--weights W[,W2] | --snapshot S] [--set VAR=value ...] [--gpu ids|all].
Several GPU ids start one process per GPU (data parallel on NCCL); under torchrun the process
group comes from the environment (NCCL on GPUs, gloo on CPU).
"""
import logging
import os
import sys

import torch
import torch.distributed as dist

log = logging.getLogger("caffe_layers.tools.train")


def add_arguments(parser, command):
    parser.add_argument("--set", action="append", default=[], metavar="VAR=value",
                        help="value of a ${VAR} placeholder in the prototxt files (repeatable)")
    parser.add_argument("--gpu", default=None, help="GPU ids, comma separated, or 'all' (default: CPU)")
    parser.add_argument("--level", type=int, default=0, help="net state level (train: of the train net, as caffe)")
    parser.add_argument("--stage", action="append", default=[], help="net state stages, comma separated or "
                        "repeated (train: added to the train net's state, as caffe)")
    if command == "train":
        parser.add_argument("--solver", required=True, help="solver .prototxt")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--weights", help="pretrained .caffemodel(s) to start from, comma separated")
        group.add_argument("--snapshot", help=".solverstate(.h5) to resume from")
        parser.add_argument("--sigint_effect", default="stop", choices=["stop", "snapshot", "none"])
        parser.add_argument("--sighup_effect", default="snapshot", choices=["stop", "snapshot", "none"])
        parser.add_argument("--resume_data", default="restart", choices=["restart", "skip"],
                            help="on --snapshot: restart the data (Caffe) or skip the batches already used")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    else:
        parser.add_argument("--model", required=True, help="net .prototxt")
        parser.add_argument("--weights", required=True, help=".caffemodel(.h5)")
        parser.add_argument("--iterations", type=int, default=50, help="number of batches")


def parse_set(items):
    variables = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects VAR=value, got {item!r}")
        key, value = item.split("=", 1)
        variables[key.strip()] = value
    return variables


CPU_FALLBACK = "CAFFE_LAYERS_CPU_FALLBACK"  # =1: a GPU request on a machine without one runs on the CPU


def gpu_ids(spec, source=None):
    """The GPU ids `spec` names ('0,1' or 'all'); `source` says where it came from (default: --gpu). One clear
    line (SystemExit) where they cannot run: no GPU, an unknown id, or an id named twice (NCCL runs one rank
    per device and refuses two ranks on one GPU)."""
    if spec is None:
        return []
    source = source or f"--gpu {spec}"
    ids = None
    if spec != "all":
        try:
            ids = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--gpu expects comma separated ids or 'all', got {spec!r}") from None
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise SystemExit(f"{source}: GPU {', '.join(map(str, twice))} named twice; data-parallel training "
                             f"runs one NCCL process per GPU (NCCL refuses two ranks on one device)")
    if not torch.cuda.is_available():
        if os.environ.get(CPU_FALLBACK) == "1":
            log.warning("%s: no CUDA device is available to torch; running on the CPU (%s=1)", source, CPU_FALLBACK)
            return []
        what = " (data-parallel training on NCCL needs one GPU per process)" if ids is None or len(ids) > 1 else ""
        raise SystemExit(f"{source}: no CUDA device is available to torch{what}; set {CPU_FALLBACK}=1 to run on "
                         f"the CPU instead")
    if ids is None:
        return list(range(torch.cuda.device_count()))
    bad = [i for i in ids if not 0 <= i < torch.cuda.device_count()]
    if bad:
        raise SystemExit(f"--gpu: no device {bad}; this machine has {torch.cuda.device_count()}")
    return ids


def solver_gpu(path, variables):
    """(spec, source) of the GPU a solver file asks for with solver_mode: GPU (device_id, default 0), as
    caffe train does without --gpu; (None, None) otherwise."""
    from caffe_layers.formats.prototxt import read_solver

    param = read_solver(path, variables)
    if param.HasField("solver_mode") and param.solver_mode == param.GPU:
        spec = str(param.device_id) if param.HasField("device_id") else "0"
        return spec, f"solver {path}: solver_mode: GPU (device {spec})"
    return None, None


def stages(items):
    """--stage values, repeated or comma separated (caffe's -stage a,b)."""
    return [s for item in items for s in item.split(",") if s]


def setup_logging():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="I%(asctime)s.%(msecs)03d %(process)d %(module)s] %(message)s",
                        datefmt="%m%d %H:%M:%S")


def run(args):
    setup_logging()
    if args.command == "test":
        return run_test(args)
    if args.gpu is not None:
        ids = gpu_ids(args.gpu)
    else:
        ids = gpu_ids(*solver_gpu(args.solver, parse_set(args.set)))
    if len(ids) > 1 and "WORLD_SIZE" not in os.environ:
        import socket

        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.start_processes(_gpu_worker, args=(args, ids, port), nprocs=len(ids), join=True, start_method="spawn")
        except mp.ProcessRaisedException as err:  # one line, not the child's traceback
            last = [line for line in str(err).splitlines() if line.strip()][-1].strip()
            raise SystemExit(f"--gpu {args.gpu}: training process {err.error_index} failed: {last}") from None
        except mp.ProcessExitedException as err:
            raise SystemExit(f"--gpu {args.gpu}: training process {err.error_index} exited with status "
                             f"{err.exit_code}") from None
        return 0
    device = torch.device("cuda", ids[0]) if ids else None
    return train(args, device)


def _gpu_worker(rank, args, ids, port):
    setup_logging()
    torch.cuda.set_device(ids[rank])
    start_group("nccl", torch.device("cuda", ids[rank]), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                world_size=len(ids))
    try:
        train(args, torch.device("cuda", ids[rank]))
    finally:
        dist.destroy_process_group()


def start_group(backend, device, **kwargs):
    """init_process_group, then one all_reduce so that a backend refusing this setup (NCCL: two ranks on one
    GPU) stops here, in one line naming the rank, instead of a traceback at the first gradient."""
    dist.init_process_group(backend, **kwargs)
    rank = dist.get_rank()
    try:
        dist.all_reduce(torch.ones(1, device=device))
    except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        dist.destroy_process_group()
        raise SystemExit(f"rank {rank}: torch.distributed ({backend}) refused to start on {device}: "
                         f"{lines[-1] if lines else type(err).__name__}") from None


def train(args, device=None):
    from caffe_layers.pycaffe import mode
    from caffe_layers.formats.prototxt import read_solver
    from caffe_layers.training.solver import SignalActions, Solver
    from caffe_layers.formats.weights import load_weights

    own_group = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        start_group("nccl" if device is not None and device.type == "cuda" else "gloo", device or torch.device("cpu"))
        own_group = True
    if device is not None and device.type == "cuda":
        mode.set_mode_gpu()
        mode.set_device(device.index or 0)
    try:
        variables = parse_set(args.set)
        param = read_solver(args.solver, variables)
        param.train_state.level = args.level  # caffe.cpp's train sets the level and adds the stages
        param.train_state.stage.extend(stages(args.stage))
        solver = Solver(param, variables, resume_data=args.resume_data, device=device)
        if args.weights:
            for path in args.weights.split(","):
                log.info("Finetuning from %s", path.strip())
                load_weights(solver.net, path.strip())
        bar = None
        if solver.rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=solver.param.max_iter, unit="it", desc="train", disable=None, file=sys.stderr)
            solver.callbacks.append(lambda s, loss: (bar.update(s.iter - bar.n), bar.set_postfix(loss=f"{loss:.4g}")))
        with SignalActions(args.sigint_effect, args.sighup_effect) as actions:
            solver.action = actions
            solver.solve(args.snapshot)
        if bar is not None:
            bar.close()
    finally:
        if own_group:
            dist.destroy_process_group()
    return 0


def run_test(args):
    from caffe_layers.pycaffe import mode
    from caffe_layers.engine.net import Net
    from caffe_layers.formats.proto import TEST
    from caffe_layers.training.solver import loss_suffix

    ids = gpu_ids(args.gpu)
    if ids:
        mode.set_mode_gpu()
        mode.set_device(ids[0])
    net = Net(args.model, args.weights, TEST, parse_set(args.set), level=args.level, stages=stages(args.stage))
    weights = net.top_loss_weights
    totals, total_loss = {}, 0.0
    for i in range(args.iterations):
        with torch.no_grad():
            values = net.run({})
            loss = net.loss(values)
        total_loss += 0.0 if loss is None else float(loss)
        for name in net.outputs:
            v = values[name].detach().double().reshape(-1).cpu().numpy()
            totals[name] = totals[name] + v if name in totals else v
            for x in v:
                log.info("Batch %d, %s = %g", i, name, x)
    log.info("Loss: %g", total_loss / args.iterations)
    for name, total in totals.items():
        for x in total / args.iterations:
            log.info("%s = %g%s", name, x, loss_suffix(weights.get(name, 0.0), x))
    return 0
