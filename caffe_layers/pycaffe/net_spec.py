"""pycaffe's NetSpec: write nets as Python code and get a NetParameter.

    n = NetSpec()
    n.data = layers.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv1 = layers.Convolution(n.data, kernel_size=3, num_output=4, weight_filler=dict(type="xavier"))
    n.relu1 = layers.ReLU(n.conv1, in_place=True)
    print(n.to_proto())

Keyword arguments go into the layer's own <type>_param message when it has that field, otherwise into
the LayerParameter; names ending in "param" always go into the LayerParameter. A dict fills a message,
a list of dicts adds repeated messages, a list (or a scalar, for a repeated field) extends a repeated
field. `ntop` sets the number of tops, `in_place=True` makes the tops the bottoms.
"""
import sys
from collections import Counter, OrderedDict

from caffe_layers.formats.proto import pb


def _type_to_param_field():
    """Layer type -> its parameter field, from the proto: ConvolutionParameter -> convolution_param."""
    out = {}
    for f in pb.LayerParameter.DESCRIPTOR.fields:
        if f.name.endswith("_param") and f.message_type is not None:
            type_name = f.message_type.name
            if type_name.endswith("Parameter"):
                out[type_name[:-len("Parameter")]] = f.name
    return out


_PARAM_FIELDS = _type_to_param_field()


def assign_proto(proto, name, value):
    """Set field `name` of message `proto` from a Python value (dicts and lists as nested messages)."""
    field = getattr(proto, name)
    repeated = hasattr(field, "extend")
    if repeated and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], dict):
            for item in value:
                message = field.add()
                for k, v in item.items():
                    assign_proto(message, k, v)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            assign_proto(field, k, v)
    else:
        setattr(proto, name, value)


class Top:
    """One output of a Function; pass it as a bottom to other layers."""

    def __init__(self, fn, n):
        self.fn, self.n = fn, n

    def to_proto(self):
        """The NetParameter of every layer this top depends on."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer call: its type, its bottom Tops and its parameters."""

    def __init__(self, type_name, inputs, params):
        self.type_name = type_name
        for i, x in enumerate(inputs):
            if not isinstance(x, Top):
                raise TypeError(f"{type_name} input {i} is not a Top (type is {type(x)})")  # pycaffe's words
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        if self.in_place and self.ntop != len(inputs):
            raise ValueError(f"{type_name}: in_place needs as many tops as bottoms")
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _name(self, names, autonames):
        if self not in names and self.ntop > 0:
            names[self] = self._top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottoms = []
        for x in self.inputs:
            x._to_proto(layers, names, autonames)
            bottoms.append(layers[x.fn].top[x.n])
        layer = pb.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(t, names, autonames) for t in self.tops)
        layer.name = self._name(names, autonames)
        own = _PARAM_FIELDS.get(self.type_name)
        for k, v in self.params.items():
            if k.endswith("param") or own is None:
                assign_proto(layer, k, v)
                continue
            try:
                assign_proto(getattr(layer, own), k, v)
            except AttributeError:
                assign_proto(layer, k, v)
        layers[self] = layer


def to_proto(*tops):
    """A NetParameter with every layer needed to compute `tops` (automatic names)."""
    layers, names, autonames = OrderedDict(), {}, Counter()
    for top in tops:
        top._to_proto(layers, names, autonames)
    net = pb.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Named tops: `n.name = layers.Type(...)`; `n.to_proto()` names tops and layers after them."""

    def __init__(self):
        object.__setattr__(self, "tops", OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(f"NetSpec has no top {name!r}") from None

    def __setitem__(self, key, value):
        self.tops[key] = value

    def __getitem__(self, key):
        return self.tops[key]

    def __delattr__(self, name):
        del self.tops[name]

    def keys(self):
        return list(self.tops)

    def to_proto(self):
        names = {v: k for k, v in self.tops.items()}
        autonames = Counter()
        layers = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = pb.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """`layers.Type(*bottoms, **params)`: a Top, a tuple of Tops (ntop > 1) or the Function (ntop=0).

    Lower-case names fall through to the caffe_layers.layers package (the layer registry), whose name
    this namespace shares in `caffe_layers`.
    """

    def __getattr__(self, name):
        package = sys.modules.get("caffe_layers.layers")
        if package is not None and hasattr(package, name):
            return getattr(package, name)
        if name.startswith("_"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return layer_fn


class Parameters:
    """`params.Pooling.MAX` is PoolingParameter.MAX."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        message = getattr(pb, name + "Parameter", None)
        if message is None:
            raise AttributeError(f"caffe.proto has no {name}Parameter")

        class Param:
            def __getattr__(self, value_name):
                return getattr(message, value_name)
        return Param()


layers = Layers()
params = Parameters()
