"""`caffe-layers device_query --gpu ids|all`: what torch sees of each GPU, as `caffe device_query`."""
import logging

import torch

from caffe_layers.tools.train import setup_logging

log = logging.getLogger("caffe_layers.tools.device_query")


def add_arguments(parser, command):
    parser.add_argument("--gpu", default="", help="GPU ids, comma separated, or 'all' (as caffe, none: query none)")


def run(args):
    setup_logging()
    log.info("Querying GPUs %s", args.gpu)
    if not args.gpu:
        return 0
    if not torch.cuda.is_available():
        raise SystemExit(f"device_query --gpu {args.gpu}: no CUDA device is available to torch (CPU only: "
                         f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    count = torch.cuda.device_count()
    ids = range(count) if args.gpu == "all" else [int(s) for s in args.gpu.split(",") if s.strip()]
    for i in ids:
        if not 0 <= i < count:
            raise SystemExit(f"device_query: no GPU {i}; this machine has {count}")
        p = torch.cuda.get_device_properties(i)
        log.info("Device id:                     %d", i)
        log.info("Major revision number:         %d", p.major)
        log.info("Minor revision number:         %d", p.minor)
        log.info("Name:                          %s", p.name)
        log.info("Total global memory:           %d", p.total_memory)
        log.info("Number of multiprocessors:     %d", p.multi_processor_count)
    return 0
