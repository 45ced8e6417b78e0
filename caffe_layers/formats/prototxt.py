"""Reading prototxt files: ${VAR} substitution, text_format parsing, upgrade of old nets."""
import re
from pathlib import Path

from google.protobuf import text_format

from caffe_layers.formats.layer_context import unknown_field_hint
from caffe_layers.formats.proto import pb

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PrototxtError(ValueError):
    """A prototxt that cannot be read: the message names the file, line and what was expected."""


def substitute(text, variables, source="<string>"):
    """Replace every ${NAME} with str(variables[NAME]); an unset name is an error naming its line."""
    variables = variables or {}
    missing = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in _VARIABLE.finditer(line):
            if match.group(1) not in variables:
                missing.append(f"{source}:{lineno}: ${{{match.group(1)}}} is not set")
    if missing:
        raise PrototxtError("unset template variables (pass them with variables= or --set NAME=value):\n  "
                            + "\n  ".join(missing))
    return _VARIABLE.sub(lambda m: str(variables[m.group(1)]), text)


def is_path(source):
    """Whether read_net takes `source` (a str or Path) as a file path: a Path, or a str with no newline,
    brace or colon; other strings are prototxt text."""
    return isinstance(source, Path) or ("\n" not in source and "{" not in source and ":" not in source)


def _read_text(source):
    """(text, name) from a path or from prototxt text (see is_path)."""
    if is_path(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prototxt not found: {path}")
        return path.read_text(), str(path)
    return source, "<string>"


def parse_text(text, message, source="<string>"):
    """Parse prototxt text into `message`; errors carry the file name, line and column."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        hint = unknown_field_hint(text, err.GetLine(), str(err)) if err.GetLine() else ""
        what = str(err).rstrip(".") + hint if hint else err
        raise PrototxtError(f"{source}:{what} (while reading a {message.DESCRIPTOR.name})") from None
    return message


def read_net(source, variables=None):
    """A V2 NetParameter from a path, prototxt text or a NetParameter (upgraded when old)."""
    from caffe_layers.formats.upgrade import upgrade_net

    if isinstance(source, pb.NetParameter):
        net = pb.NetParameter()
        net.CopyFrom(source)
        return upgrade_net(net)
    text, name = _read_text(source)
    net = parse_text(substitute(text, variables, name), pb.NetParameter(), name)
    return upgrade_net(net, name)


def read_solver(source, variables=None):
    from caffe_layers.formats.upgrade import upgrade_solver

    text, name = _read_text(source)
    return upgrade_solver(parse_text(substitute(text, variables, name), pb.SolverParameter(), name), name)
