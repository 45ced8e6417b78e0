"""Every proto field of ours (numbers 9001 to 9999) is documented: proto comment, proto/README.md, docs/quirks.md."""
import re
from pathlib import Path

from caffe_layers.formats.proto import pb

ROOT = Path(__file__).resolve().parents[1]


def _our_fields():
    found = []

    def walk(desc):
        for f in desc.fields:
            if 9001 <= f.number < 10000:  # segaware's own deletebottom / deletetop are above
                found.append((desc.name, f.name, f.number))
        for nested in desc.nested_types:
            walk(nested)
    for desc in pb.DESCRIPTOR.message_types_by_name.values():
        walk(desc)
    return found


def test_our_fields_documented():
    fields = _our_fields()
    assert ("PowerParameter", "exact_grad", 9001) in fields and len(fields) >= 14
    proto = (ROOT / "proto" / "caffe.proto").read_text()
    readme = (ROOT / "proto" / "README.md").read_text()
    quirks = (ROOT / "docs" / "quirks.md").read_text()
    holder = {f.message_type.name: f.name for f in pb.LayerParameter.DESCRIPTOR.fields if f.message_type}
    for message, name, number in fields:
        # the comment just above the field says "ours" (or the field line does)
        assert re.search(rf"ours[^\n]*\n([ \t]*//[^\n]*\n)*[ \t]*optional \S+ {name} = {number}\b|"
                         rf"optional \S+ {name} = {number}\b[^\n]*ours", proto), (message, name)
        assert re.search(rf"`{message}`\s*\|\s*`{name}`", readme), f"proto/README.md lacks {message}.{name}"
        if message == "LayerParameter":  # the parameter of a layer of ours, not a quirk option
            continue
        block = "filler" if message == "FillerParameter" else holder[message]
        assert re.search(rf"{block} \{{[^}}]*\b{name}:", quirks), f"docs/quirks.md lacks {block} {{ {name} }}"
