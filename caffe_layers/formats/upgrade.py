"""Upgrading old net and solver definitions, as Caffe's UpgradeNetAsNeeded and
UpgradeSolverAsNeeded do (BVLC src/caffe/util/upgrade_proto.cpp).

Order (as Caffe): V0 -> V1 (padding layers folded into convolutions), old data transformation
fields -> transform_param, V1 -> V2, net-level inputs -> an Input layer, old BatchNorm param specs.
"""
import logging

from caffe_layers.formats.proto import pb

log = logging.getLogger(__name__)


class UpgradeError(ValueError):
    """A net or solver definition that cannot be upgraded; the message names the source."""


# ---- V0 -> V1 ----------------------------------------------------------------------------------
_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS", "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT", "im2col": "IM2COL",
    "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS", "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN", "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# V0 field -> {v0 layer type: (V1 sub-message, field in it)}; "*" means any type
_V0_FIELDS = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"), "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"), "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {"*": ("transform_param", "scale")},
    "meanfile": {"*": ("transform_param", "mean_file")},
    "batchsize": {"data": ("data_param", "batch_size"), "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "cropsize": {"*": ("transform_param", "crop_size")},
    "mirror": {"*": ("transform_param", "mirror")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}


def _set(message, field, value):
    """Set a scalar, append to a repeated field, or copy a message field."""
    fd = message.DESCRIPTOR.fields_by_name[field]
    if fd.is_repeated:
        getattr(message, field).append(value)
    elif fd.message_type is not None:
        getattr(message, field).CopyFrom(value)
    else:
        setattr(message, field, value)


def upgrade_v0_padding_layers(net, source="<net>"):
    """A copy of a V0 net without "padding" layers; each folds its pad into the conv/pool after it."""
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_top = {name: -1 for name in net.input}  # blob -> index of the V0 layer producing it
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise UpgradeError(f"{source}: unknown blob input {blob!r} to layer {v0.name!r}")
            k = last_top[blob]
            if k == -1:
                continue
            src = net.layers[k]
            if src.layer.type == "padding":
                if v0.type not in ("conv", "pool"):
                    raise UpgradeError(f"{source}: padding layer {src.layer.name!r} feeds layer "
                                       f"{v0.name!r} of type {v0.type!r}; only conv and pool can take it")
                if len(conn.bottom) != 1 or len(src.bottom) != 1 or len(src.top) != 1:
                    raise UpgradeError(f"{source}: padding layer {src.layer.name!r} and layer "
                                       f"{v0.name!r} must each have a single input and output")
                out.layers[-1].layer.pad = src.layer.pad
                out.layers[-1].bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def upgrade_v0_layer(conn, source="<net>"):
    """One V0 layer connection -> a V1LayerParameter; returns (layer, fully compatible)."""
    layer = pb.V1LayerParameter()
    layer.bottom.extend(conn.bottom)
    layer.top.extend(conn.top)
    ok = True
    if not conn.HasField("layer"):
        return layer, ok
    v0 = conn.layer
    if v0.HasField("name"):
        layer.name = v0.name
    if v0.HasField("type"):
        if v0.type not in _V0_TYPES:
            raise UpgradeError(f"{source}: layer {v0.name!r}: unknown V0 layer type {v0.type!r}")
        layer.type = pb.V1LayerParameter.LayerType.Value(_V0_TYPES[v0.type])
    layer.blobs.extend(v0.blobs)
    layer.blobs_lr.extend(v0.blobs_lr)
    layer.weight_decay.extend(v0.weight_decay)
    for v0_field, targets in _V0_FIELDS.items():
        if not v0.HasField(v0_field):
            continue
        target = targets.get(v0.type, targets.get("*"))
        if target is None:
            log.error("%s: layer %r: unknown parameter %s for layer type %s", source, v0.name,
                      v0_field, v0.type)
            ok = False
            continue
        sub, name = target
        value = getattr(v0, v0_field)
        if v0_field == "pool":  # V0 and V1 pool enums share names
            value = pb.PoolingParameter.PoolMethod.Value(pb.V0LayerParameter.PoolMethod.Name(value))
        if name is None:
            getattr(layer, sub).CopyFrom(value)
        else:
            _set(getattr(layer, sub), name, value)
    return layer, ok


def upgrade_v0_net(net, source="<net>"):
    """V0 net (layers { layer { type: "conv" ... } }) -> V1 net; returns (net, fully compatible)."""
    padded = upgrade_v0_padding_layers(net, source)
    out = pb.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    ok = True
    for conn in padded.layers:
        layer, layer_ok = upgrade_v0_layer(conn, source)
        out.layers.add().CopyFrom(layer)
        ok &= layer_ok
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out, ok


# ---- old data transformation fields ------------------------------------------------------------
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_DATA_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                "WINDOW_DATA": "window_data_param"}


def _data_param_of(layer):
    name = _DATA_PARAMS.get(pb.V1LayerParameter.LayerType.Name(layer.type)) if layer.HasField("type") else None
    return getattr(layer, name) if name else None


def net_needs_data_upgrade(net):
    for layer in net.layers:
        param = _data_param_of(layer)
        if param is not None and any(param.HasField(f) for f in _TRANSFORM_FIELDS):
            return True
    return False


def upgrade_net_data_transformation(net):
    """V1 Data/ImageData/WindowData scale, mean_file, crop_size, mirror -> transform_param."""
    for layer in net.layers:
        param = _data_param_of(layer)
        if param is None:
            continue
        for f in _TRANSFORM_FIELDS:
            if param.HasField(f):
                setattr(layer.transform_param, f, getattr(param, f))
                param.ClearField(f)
    return net


# ---- V1 -> V2 ----------------------------------------------------------------------------------
_V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col", "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN", "POOLING": "Pooling",
    "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def v1_type_name(type_value):
    """The V2 type string of a V1LayerParameter.LayerType value."""
    return _V1_TYPES[pb.V1LayerParameter.LayerType.Name(type_value)]


def upgrade_v1_layer(v1, source="<net>"):
    """One V1LayerParameter -> a LayerParameter; returns (layer, fully compatible)."""
    layer = pb.LayerParameter()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = v1_type_name(v1.type)
    layer.blobs.extend(v1.blobs)

    def spec(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = pb.ParamSpec.DimCheckMode.Value(pb.V1LayerParameter.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for fd, value in v1.ListFields():  # every *_param (transform_param included) copies over
        if fd.name.endswith("_param") and fd.message_type is not None:
            getattr(layer, fd.name).CopyFrom(value)
    ok = True
    if v1.HasField("layer"):
        log.error("%s: layer %r: input NetParameter has a V0 layer -- ignoring it", source, v1.name)
        ok = False
    return layer, ok


def upgrade_v1_net(net, source="<net>"):
    """A V1 net (`layers` entries) -> V2 (`layer` entries); returns (net, fully compatible)."""
    if len(net.layer):
        # BVLC refuses; the segaware fork instead logs an error and drops the `layer` entries
        raise UpgradeError(f"{source}: refusing to upgrade a net that has both 'layer' and 'layers' "
                           f"fields; write it all in the V2 'layer {{ type: \"Name\" }}' format")
    out = pb.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    ok = True
    for i, v1 in enumerate(net.layers):
        layer, layer_ok = upgrade_v1_layer(v1, source)
        out.layer.add().CopyFrom(layer)
        if not layer_ok:
            log.error("%s: upgrade of input layer %d failed", source, i)
        ok &= layer_ok
    return out, ok


# ---- net-level inputs, BatchNorm ---------------------------------------------------------------
def upgrade_net_input(net):
    """Net-level input / input_dim / input_shape fields become one Input layer named "input".

    Inputs without any shape (legacy .caffemodel files) are simply dropped, as in Caffe.
    """
    if not net.input:
        return net
    if net.input_dim and len(net.input_dim) != 4 * len(net.input):
        raise ValueError(f"net {net.name!r}: input_dim must give 4 values per input "
                         f"({len(net.input)} inputs, {len(net.input_dim)} values)")
    if net.input_shape and len(net.input_shape) not in (1, len(net.input)):
        raise ValueError(f"net {net.name!r}: {len(net.input_shape)} input_shape for {len(net.input)} inputs")
    if net.input_dim or net.input_shape:
        layer = pb.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if net.input_shape:
                shape.CopyFrom(net.input_shape[i if len(net.input_shape) > 1 else 0])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_dim")
    net.ClearField("input_shape")
    return net


def upgrade_net_batch_norm(net):
    """BatchNorm layers declaring 3 param specs (the old definition) get lr_mult = decay_mult = 0."""
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0
                spec.decay_mult = 0
    return net


def upgrade_net(net, source="<net>"):
    """Bring a parsed NetParameter to the V2 format in place and return it (UpgradeNetAsNeeded).

    Problems that Caffe only logs ("continuing anyway") are logged here too.
    """
    upgraded = net
    if any(c.HasField("layer") for c in net.layers):
        log.info("%s: upgrading deprecated V0LayerParameter", source)
        upgraded, ok = upgrade_v0_net(upgraded, source)
        if not ok:
            log.error("%s: one or more problems upgrading V0 layers (see above); continuing anyway", source)
    if net_needs_data_upgrade(upgraded):
        log.info("%s: upgrading deprecated data transformation parameters", source)
        upgrade_net_data_transformation(upgraded)
    if len(upgraded.layers):
        log.info("%s: upgrading deprecated V1LayerParameter", source)
        upgraded, ok = upgrade_v1_net(upgraded, source)
        if not ok:
            log.error("%s: one or more problems upgrading V1 layers (see above); continuing anyway", source)
    upgrade_net_input(upgraded)
    upgrade_net_batch_norm(upgraded)
    if upgraded is not net:
        net.CopyFrom(upgraded)
    return net


# ---- solver ------------------------------------------------------------------------------------
_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
                 "ADADELTA": "AdaDelta", "ADAM": "Adam"}


def upgrade_solver(solver, source="<solver>"):
    """The deprecated solver_type enum becomes the `type` string, in place (UpgradeSolverAsNeeded)."""
    if not solver.HasField("solver_type"):
        return solver
    if solver.HasField("type"):
        raise UpgradeError(f"{source}: old solver_type field (enum) and new type field (string) "
                           f"cannot both be given")
    solver.type = _SOLVER_TYPES[pb.SolverParameter.SolverType.Name(solver.solver_type)]
    solver.ClearField("solver_type")
    log.info("%s: upgraded deprecated solver_type to type %r", source, solver.type)
    return solver

