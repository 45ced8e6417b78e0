"""`caffe-layers run script.py [args...]` and `caffe-layers run -m module [args...]`: run an unchanged
pycaffe script (as python would, through runpy) with `import caffe` and every `caffe.<sub>` module
resolving to caffe_layers.pycaffe and its submodules.

The alias is a sys.meta_path finder installed by this command only (`caffe_alias()`), never on import.
"""
import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys
import traceback

ALIAS, TARGET = "caffe", "caffe_layers.pycaffe"


class _ExistingModule(importlib.abc.Loader):
    """Hands the import system a module that is already loaded, leaving its own __spec__ in place."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self._own_spec
        for attribute, value in self._own_attributes.items():
            setattr(module, attribute, value)

    def prepare(self):
        self._own_spec = self.module.__spec__
        self._own_attributes = {k: getattr(self.module, k) for k in ("__loader__", "__package__", "__path__")
                                if hasattr(self.module, k)}


class CaffeAlias(importlib.abc.MetaPathFinder):
    """`caffe` -> caffe_layers.pycaffe, `caffe.x.y` -> caffe_layers.pycaffe.x.y (the same module objects)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real_name = TARGET + fullname[len(ALIAS):]
        try:
            module = importlib.import_module(real_name)
        except ModuleNotFoundError as err:
            if err.name == real_name:
                return None  # no such pycaffe module here: the usual ImportError follows
            raise
        loader = _ExistingModule(module)
        loader.prepare()
        is_package = hasattr(module, "__path__")
        return importlib.util.spec_from_loader(fullname, loader, is_package=is_package)


@contextlib.contextmanager
def caffe_alias():
    """While inside, `import caffe` is caffe_layers.pycaffe. A `caffe` imported before is set aside."""
    finder = CaffeAlias()
    saved = {k: v for k, v in sys.modules.items() if k == ALIAS or k.startswith(ALIAS + ".")}
    for k in saved:
        del sys.modules[k]
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if k == ALIAS or k.startswith(ALIAS + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)


def add_arguments(parser, command):
    parser.usage = "caffe-layers run script.py [args...] | caffe-layers run -m module [args...]"
    parser.add_argument("argv", nargs="*", help="the script (or -m and a module name) and its own arguments")


def run(args):
    argv = list(args.argv)
    module = argv[:1] == ["-m"]
    if module:
        argv = argv[1:]
    if not argv:
        print("caffe-layers run: error: give a script, or -m and a module name", file=sys.stderr)
        return 2
    return run_script(argv[0], argv[1:], module=module)


def run_script(target, argv, module=False):
    """Run `target` (a path, or a module name with module=True) as __main__ with sys.argv[1:] = argv;
    returns its exit status (SystemExit is caught, as the interpreter would)."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        with caffe_alias():
            if module:
                sys.argv = [target] + list(argv)  # runpy puts the module's file in argv[0]
                sys.path.insert(0, "")
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target] + list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python script.py`
                runpy.run_path(target, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except Exception as err:  # as python prints it: the script's frames, not ours or runpy's
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next
        traceback.print_exception(type(err), err, tb)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
