"""The `caffe-layers` command. Each subcommand lives in its own module with
`add_arguments(parser, command)` and `run(args) -> exit status` (args.command is the name)."""
import argparse
import importlib
import sys

COMMANDS = {
    "convert": ("caffe_layers.tools.convert", "convert weights between .caffemodel(.h5) and .pt"),
    "train": ("caffe_layers.tools.train", "train from a solver.prototxt, as `caffe train`"),
    "test": ("caffe_layers.tools.train", "score a model, as `caffe test`"),
    "time": ("caffe_layers.tools.timing", "per-layer forward and backward time, as `caffe time`"),
    "dump": ("caffe_layers.tools.dump", "write every layer's tops and the parameters to .npz/.h5"),
    "compare": ("caffe_layers.tools.compare", "layer-by-layer comparison against reference blobs"),
    "draw": ("caffe_layers.pycaffe.draw", "draw a net as .png/.svg"),
    "demo": ("caffe_layers.tools.demo", "the segmentation-aware demo on the shipped sample"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="caffe-layers", description="Caffe nets, weights and tools in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # that command is not part of this installation
        sub_parser = sub.add_parser(name, help=help_text)
        module.add_arguments(sub_parser, name)
        sub_parser.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
