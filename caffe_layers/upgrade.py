"""Upgrading old net definitions to the V2 format, as Caffe's UpgradeNetAsNeeded does."""
from caffe_layers.proto import pb


def upgrade_net_input(net):
    """Net-level input / input_dim / input_shape fields become one Input layer named "input"."""
    if not net.input:
        return net
    if net.input_dim and len(net.input_dim) != 4 * len(net.input):
        raise ValueError(f"net {net.name!r}: input_dim must give 4 values per input "
                         f"({len(net.input)} inputs, {len(net.input_dim)} values)")
    if net.input_shape and len(net.input_shape) not in (1, len(net.input)):
        raise ValueError(f"net {net.name!r}: {len(net.input_shape)} input_shape for {len(net.input)} inputs")
    layer = pb.LayerParameter(name="input", type="Input")
    for i, name in enumerate(net.input):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if net.input_dim:
            shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        elif net.input_shape:
            shape.CopyFrom(net.input_shape[i if len(net.input_shape) > 1 else 0])
    layers = [layer] + list(net.layer)
    del net.layer[:]
    net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_dim")
    net.ClearField("input_shape")
    return net


def upgrade_net(net, source="<net>"):
    """Bring a parsed NetParameter to the V2 format in place and return it."""
    if len(net.layers):
        raise NotImplementedError(f"{source}: V1 'layers' upgrade is not available yet")
    return upgrade_net_input(net)
