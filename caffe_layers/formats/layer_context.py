"""Which layer a line of prototxt text belongs to, for error messages (an unknown parameter field
names the layer, its type and whether that type is known)."""
import re

# name -> whether a layer class is registered for that type; set by caffe_layers.layers on import
# (formats/ sits above layers/ and does not import it)
is_known_type = None

_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[{}]|\n|[A-Za-z_][A-Za-z0-9_]*|[^\s{}"\'#]+')
_UNKNOWN_FIELD = re.compile(r'Message type "caffe\.(\w+)" has no field named "(\w+)"')


def enclosing_layer(text, line):
    """(name, type) of the top-level `layer { }` / `layers { }` block that contains 1-based `line`, or None."""
    depth, lineno, block, found = 0, 1, None, None
    tokens = _TOKEN.findall(text)
    for i, tok in enumerate(tokens):
        if tok == "\n":
            lineno += 1
            continue
        if tok == "{":
            if depth == 0:
                head = [t for t in tokens[max(0, i - 3):i] if t not in ("\n", ":")]
                block = {"start": lineno} if head and head[-1] in ("layer", "layers") else None
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0 and block is not None:
                if block["start"] <= line <= lineno:
                    found = block
                block = None
        elif block is not None and depth == 1 and tok in ("name", "type"):
            value = next((t for t in tokens[i + 1:i + 4] if t not in (":", "\n")), "")
            block.setdefault(tok, value)
        if found:
            break
    if block is not None and block["start"] <= line:   # an unclosed last block
        found = block
    return (found.get("name", ""), found.get("type", "")) if found else None


def unknown_field_hint(text, line, message):
    """' in layer "n" of type "T" (...)' for an unknown-field parse error inside a layer, else ''."""
    m = _UNKNOWN_FIELD.search(message)
    where = enclosing_layer(text, line) if m else None
    if not where:
        return ""
    name, type_name = (v.strip("\"'") for v in where)
    quoted = where[1][:1] in ("\"", "'")         # V1 `layers` name their type by an unquoted enum
    if is_known_type is not None and quoted:
        known = is_known_type(type_name)
        state = ("a type caffe_layers knows, so the field is misspelled or belongs to another fork's "
                 "version of it" if known else
                 "a type caffe_layers does not know either; @caffe_layers.register_layer cannot help while "
                 "its parameter field is missing from proto/caffe.proto")
        return f' in layer "{name}" of type "{type_name}" ({state})'
    return f' in layer "{name}" of type "{type_name}"'
