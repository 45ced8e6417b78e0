"""Reading prototxt files: ${VAR} substitution, text_format parsing, upgrade of old nets."""
import os
import re
from pathlib import Path

from google.protobuf import text_format

from caffe_layers.errors import PrototxtError, check_readable_file
from caffe_layers.formats.layer_context import unknown_field_hint
from caffe_layers.formats.proto import pb

__all__ = ["PrototxtError", "substitute", "is_path", "parse_text", "read_net", "read_solver"]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def comment_start(line):
    """Where the # comment of a prototxt line starts (a # inside a quoted string is not one)."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#":
            return i
        i += 1
    return len(line)


def substitute(text, variables, source="<string>"):
    """Replace every ${NAME} with str(variables[NAME]); an unset name is an error naming its line."""
    if "${" not in text:  # nothing to replace: skip the per-character comment scan
        return text
    variables = variables or {}
    missing = []
    lines = text.splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        for match in _VARIABLE.finditer(line, 0, comment_start(line)):
            if match.group(1) not in variables:
                missing.append(f"{source}:{lineno}: ${{{match.group(1)}}} is not set")
    if missing:
        raise PrototxtError("; ".join(missing) + " (pass template variables with variables= or --set NAME=value)")
    out = []
    for line in lines:  # a ${NAME} inside a comment stays as it is
        cut = comment_start(line)
        out.append(_VARIABLE.sub(lambda m: str(variables[m.group(1)]), line[:cut]) + line[cut:])
    return "".join(out)


def is_path(source):
    """Whether read_net takes `source` (a str or Path) as a file path: a Path, an existing file or
    folder, or a str with no newline, brace or colon; other strings are prototxt text."""
    if isinstance(source, os.PathLike) or os.path.exists(source):
        return True
    return "\n" not in source and "{" not in source and ":" not in source


def decode(data, name):
    """Prototxt bytes as text. As protobuf's C++ tokenizer, bytes that are not UTF-8 are accepted in
    a # comment (replaced); elsewhere they are an error naming the line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        line = raw.decode("utf-8", errors="surrogateescape")
        bad = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
        if bad is not None and bad < comment_start(line):
            raise PrototxtError(f"{name}:{lineno}:{bad + 1}: byte 0x{ord(line[bad]) - 0xDC00:02x} is "
                                f"not UTF-8 (prototxt text must be UTF-8 outside comments)")
        lines.append(raw.decode("utf-8", errors="replace"))
    return "".join(lines)


def _read_text(source):
    """(text, name) from a path or from prototxt text (see is_path)."""
    if is_path(source):
        path = check_readable_file(source, "prototxt")
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise PrototxtError(f"{path}: cannot read the prototxt: {err.strerror or err}") from err
        return decode(data, path), path
    return source, "<string>"


def parse_text(text, message, source="<string>"):
    """Parse prototxt text into `message`; errors carry the file name, line and column."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        hint = unknown_field_hint(text, err.GetLine(), str(err)) if err.GetLine() else ""
        what = str(err).rstrip(".") + hint if hint else err
        raise PrototxtError(f"{source}:{what} (while reading a {message.DESCRIPTOR.name})") from err
    except (ValueError, TypeError, UnicodeError, RecursionError) as err:  # protobuf's other failures
        raise PrototxtError(f"{source}: {err} (while reading a {message.DESCRIPTOR.name})") from err
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
