"""Build: generate caffe_layers/formats/caffe_pb2.py from proto/caffe.proto (never edited by hand), and the native
kernels in cuda/: caffe_layers.native._native_cpu (C++, OpenMP) always, caffe_layers.native._native_cuda only where
`nvcc` is on PATH (built by nvcc itself, static cudart, no CUDA-enabled torch needed).
Set CAFFE_LAYERS_NO_CUDA=1 to skip the CUDA module; CAFFE_LAYERS_CUDA_ARCHS (default "75 80 90", plus
PTX of the lowest for newer GPUs) picks the -gencode targets. A failed CUDA build is a warning, not an
error: CUDA tensors then use the pure-PyTorch references.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.errors import CompileError
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def generate_caffe_pb2():
    from grpc_tools import protoc

    proto = ROOT / "proto" / "caffe.proto"
    args = ["protoc", f"-I{proto.parent}", f"--python_out={ROOT / 'caffe_layers' / 'formats'}", str(proto)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    # the classes' __module__ is the module protoc names ('caffe_pb2'): name the package's, so pickle finds them
    generated = ROOT / "caffe_layers" / "formats" / "caffe_pb2.py"
    text = generated.read_text()
    generated.write_text(text.replace("(DESCRIPTOR, 'caffe_pb2', _globals)",
                                      "(DESCRIPTOR, 'caffe_layers.formats.caffe_pb2', _globals)"))


def _pybind11_include():
    import pybind11

    return pybind11.get_include()


class BuildNative(build_ext):
    """build_ext that compiles the CUDA module with nvcc (host code by nvcc's host compiler)."""

    def build_extensions(self):
        self.extensions = [e for e in self.extensions if e.name != CUDA_NAME or _nvcc()]
        for ext in self.extensions:
            ext.include_dirs.append(_pybind11_include())
        super().build_extensions()

    def build_extension(self, ext):
        if ext.name != CUDA_NAME:
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("CAFFE_LAYERS_CUDA_ARCHS", "").split() or DEFAULT_CUDA_ARCHS
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        low = min(archs, key=int)  # PTX of the lowest: newer GPUs compile it when the driver loads the module
        gencode.append(f"-gencode=arch=compute_{low},code=compute_{low}")
        includes = [f"-I{d}" for d in ext.include_dirs + [sysconfig.get_paths()["include"]]]
        cmd = [_nvcc(), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--cudart", "static",
               *gencode, *includes, *ext.sources, "-o", str(out)]
        print(" ".join(cmd), flush=True)
        try:
            subprocess.check_call(cmd)
        except (OSError, subprocess.CalledProcessError) as err:
            # the extension is optional: setuptools goes on without it (CUDA tensors then use the
            # pure-PyTorch references); CI's test_native_modules_are_built fails, so the .cu cannot rot
            raise CompileError(f"nvcc failed ({err}); set CAFFE_LAYERS_CUDA_ARCHS to archs this nvcc supports, "
                               f"or CAFFE_LAYERS_NO_CUDA=1 to skip the CUDA module") from err


def _nvcc():
    if os.environ.get("CAFFE_LAYERS_NO_CUDA"):
        return None
    return shutil.which("nvcc")


CUDA_NAME = "caffe_layers.native._native_cuda"
DEFAULT_CUDA_ARCHS = ["75", "80", "90"]  # Turing (the lowest CUDA 13 supports), Ampere, Hopper
openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
extensions = [
    Extension("caffe_layers.native._native_cpu", ["cuda/native_cpu.cpp"], include_dirs=["cuda"], language="c++",
              depends=["cuda/native_cpu_kernels.h", "cuda/geometry.h"],
              extra_compile_args=["-O3", "-std=c++17", *openmp], extra_link_args=openmp),
    Extension(CUDA_NAME, ["cuda/native_cuda.cu", "cuda/bind_cuda.cpp"], include_dirs=["cuda"], optional=True),
]

generate_caffe_pb2()
setup(ext_modules=extensions, cmdclass={"build_ext": BuildNative})
