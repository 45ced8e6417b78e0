"""Build: generate caffe_layers/caffe_pb2.py from proto/caffe.proto (never edited by hand)."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def generate_caffe_pb2():
    from grpc_tools import protoc

    proto = ROOT / "proto" / "caffe.proto"
    args = ["protoc", f"-I{proto.parent}", f"--python_out={ROOT / 'caffe_layers'}", str(proto)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")


generate_caffe_pb2()
setup()
