"""Layer registry: Caffe type name -> layer class. One layer type per module in this package.

A module registers its class with `@register("TypeName")`. Every module here is imported on the
first lookup, so adding a layer means adding a module; user code can register its own classes too.
"""
import importlib
import pkgutil

from caffe_layers.formats import layer_context

_REGISTRY = {}
_discovered = False


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


def known_types():
    _discover()
    return sorted(_REGISTRY)


def layer_class(type_name, layer_name="?"):
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
    _discover()
    return type_name in _REGISTRY


layer_context.is_known_type = _is_known_type
