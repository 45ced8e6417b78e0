"""A pycaffe script that runs unchanged on caffe_layers (quoted by the README)."""
from pathlib import Path

import numpy as np

import caffe_layers as caffe

caffe.set_mode_cpu()
net = caffe.Net(str(Path(__file__).with_name("example_net.prototxt")), caffe.TEST)

rng = np.random.RandomState(0)
net.blobs["data"].data[...] = rng.randn(*net.blobs["data"].data.shape)
net.blobs["label"].data[...] = rng.randint(0, 3, size=net.blobs["label"].data.shape)
out = net.forward()
print("loss", float(out["loss"]))

net.backward()
for name, blobs in net.params.items():
    print(name, [b.data.shape for b in blobs], "weight diff norm", float(np.linalg.norm(blobs[0].diff)))
