"""The `caffe-layers` command. Each subcommand lives in its own module with
`add_arguments(parser, command)` and `run(args) -> exit status` (args.command is the name).

Caffe's gflags spellings work too: `-flag v`, `-flag=v`, `--flag v`, `--flag=v`, flags before or after
the command (`caffe-layers -solver s.prototxt train`), `--version`. Errors of a command are one line
(`--debug` shows the traceback); `run` passes everything after the script to it untouched.
"""
import argparse
import importlib
import re
import sys

COMMANDS = {
    "convert": ("caffe_layers.tools.convert", "convert weights between .caffemodel(.h5) and .pt"),
    "train": ("caffe_layers.tools.train", "train from a solver.prototxt, as `caffe train`"),
    "test": ("caffe_layers.tools.train", "score a model, as `caffe test`"),
    "time": ("caffe_layers.tools.timing", "per-layer forward and backward time, as `caffe time`"),
    "device_query": ("caffe_layers.tools.device_query", "show GPU diagnostic information, as `caffe device_query`"),
    "dump": ("caffe_layers.tools.dump", "write every layer's tops and the parameters to .npz/.h5"),
    "compare": ("caffe_layers.tools.compare", "layer-by-layer comparison against reference blobs"),
    "draw": ("caffe_layers.pycaffe.draw", "draw a net as .png/.svg"),
    "demo": ("caffe_layers.tools.demo", "the segmentation-aware demo on the shipped sample"),
    "run": ("caffe_layers.tools.run", "run an unchanged pycaffe script (`import caffe` is caffe_layers)"),
}
GLOBAL_FLAGS = ("--debug", "--version")
_GFLAG = re.compile(r"^-[A-Za-z_][A-Za-z0-9_-]+(=.*)?$")  # -solver, -gpu=0: gflags' one-dash long flags


def build_parser():
    parser = argparse.ArgumentParser(prog="caffe-layers", description="Caffe nets, weights and tools in PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command")
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
    return parser, sub.choices


def _switches(subparsers):
    """Option strings that take no value, in any subcommand."""
    out = set(GLOBAL_FLAGS) | {"-h", "--help"}
    for p in subparsers.values():
        for action in p._actions:
            if action.option_strings and action.nargs == 0:
                out.update(action.option_strings)
    return out


def normalize(argv, subparsers):
    """Caffe's spellings to argparse's: one-dash long flags get two dashes, flags before the command move
    after it, --debug/--version go first. `run` keeps everything after its script untouched."""
    switches = _switches(subparsers)
    leading, command, rest, i = [], None, [], 0
    while i < len(argv):
        token = argv[i]
        if _GFLAG.match(token):
            token = "-" + token
        if token in subparsers:
            command, rest = token, argv[i + 1:]
            break
        leading.append(token)
        if token.startswith("--") and "=" not in token and token not in switches and i + 1 < len(argv):
            leading.append(argv[i + 1])  # the flag's value
            i += 1
        i += 1
    if command is None:
        return leading
    if command == "run":
        tail = rest
    else:
        tail = ["-" + t if _GFLAG.match(t) else t for t in rest]
    front = [t for t in leading + (tail if command != "run" else []) if t in GLOBAL_FLAGS]
    leading = [t for t in leading if t not in GLOBAL_FLAGS]
    if command != "run":
        tail = [t for t in tail if t not in GLOBAL_FLAGS]
    return front + [command] + leading + tail


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    argv = normalize(argv, subparsers)
    script_argv = None
    at = argv.index("run") if "run" in argv else None  # normalize puts only global flags before a command
    if at is not None and argv[at + 1:] not in (["-h"], ["--help"]):
        argv, script_argv = argv[:at + 1], argv[at + 1:]  # the script's arguments bypass argparse
    args = parser.parse_args(argv)
    if script_argv is not None:
        args.argv = script_argv
    if args.version:
        from caffe_layers.pycaffe import __version__

        print(f"caffe-layers version {__version__}")
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("caffe-layers: error: give a command: " + ", ".join(subparsers), file=sys.stderr)
        return 2
    if args.debug or args.command == "run":  # a script's own errors show as python shows them
        return args._run(args)
    try:
        return args._run(args)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"caffe-layers {args.command}: error: {message} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
