"""Layer registry: Caffe type name -> layer class. One layer type per module in this package.

A module registers its class with `@register("TypeName")`, so adding a layer means adding a module; user
code can register its own classes too. A lookup imports only the type's own module: the one whose name,
lowercased without underscores, is the type's lowercased (`InnerProduct`: inner_product.py), or the one
`_MODULE_OF` names. Other lookups (an unknown type, `known_types()`) import every module here.
"""
import importlib
import pkgutil

from caffe_layers.formats import layer_context

_REGISTRY = {}
_discovered = False
_MODULE_OF = {"SoftmaxWithLoss": "softmax_loss", "Python": "python_layer"}  # types not named by their module
_modules_by_key = None  # lowercased module name without underscores -> module name


def register(*type_names):
    def deco(cls):
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"layer type {name!r} is registered twice: "
                                 f"{_REGISTRY[name].__module__} and {cls.__module__}")
            _REGISTRY[name] = cls
        cls.caffe_types = tuple(getattr(cls, "caffe_types", ())) + type_names
        return cls
    return deco


def _discover():
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def own_module(type_name):
    """The module of this package named after `type_name` (full name), or None."""
    global _modules_by_key
    if _modules_by_key is None:
        _modules_by_key = {info.name.replace("_", ""): info.name for info in pkgutil.iter_modules(__path__)}
    module = _MODULE_OF.get(type_name) or _modules_by_key.get(type_name.lower())
    return None if module is None else f"{__name__}.{module}"


def _import_own_module(type_name):
    module = own_module(type_name)
    if module is not None:
        importlib.import_module(module)  # (a dictionary lookup once imported)


def known_types():
    _discover()
    return sorted(_REGISTRY)


def layer_class(type_name, layer_name="?"):
    _import_own_module(type_name)  # before the registry: a user class of a built-in name still clashes
    if type_name not in _REGISTRY:
        _discover()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise ValueError(
            f"layer {layer_name!r}: unknown layer type {type_name!r}. Known types: "
            f"{', '.join(known_types())}. To add one, subclass caffe_layers.Layer and decorate it "
            f"with @caffe_layers.register_layer({type_name!r}) before building the net."
        ) from None


def _is_known_type(type_name):
    _import_own_module(type_name)
    if type_name not in _REGISTRY:
        _discover()
    return type_name in _REGISTRY


layer_context.is_known_type = _is_known_type
