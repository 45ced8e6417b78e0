"""Run a Caffe detector through caffe_layers and OpenCV dnn on one image and compare every top and
the detections.

    python tools/compare_opencv.py deploy.prototxt weights.caffemodel image.jpg \
        --size 320,240 --mean 104,117,123 [--scale 1] [--rgb] [--output detection_out]

The image is resized to --size (width,height) and made a blob with cv2.dnn.blobFromImage (BGR
unless --rgb, mean subtracted, then scaled). OpenCV runs with layer fusion off so that every
top is comparable. Prints per top the max abs / max relative error, then the detections of both
(rows [image, label, score, xmin, ymin, xmax, ymax]; OpenCV's all-zero padding rows dropped) and
whether they are equal as sets (within --det-tol). Exit status 0 when every top is within --rtol and the detections are equal.
"""
import argparse
import sys

import cv2
import numpy as np
import torch

import caffe_layers as caffe
from caffe_layers.formats.prototxt import read_net


def detection_sets_equal(a, b, tol):
    a, b = a.reshape(-1, 7), b.reshape(-1, 7)
    if len(a) != len(b):
        return False
    key = lambda rows: rows[np.lexsort((rows[:, 3], -rows[:, 2], rows[:, 1], rows[:, 0]))]
    return bool(np.allclose(key(a), key(b), rtol=0, atol=tol))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("weights")
    ap.add_argument("image")
    ap.add_argument("--size", default="320,240", help="network input width,height")
    ap.add_argument("--mean", default="0,0,0")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rgb", action="store_true", help="feed RGB (default BGR, as cv2 loads images)")
    ap.add_argument("--output", default="detection_out", help="the detection top (nets without it: tops only)")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--det-tol", type=float, default=1e-4, help="absolute tolerance on detection rows")
    args = ap.parse_args(argv)

    width, height = (int(v) for v in args.size.split(","))
    mean = tuple(float(v) for v in args.mean.split(","))
    image = cv2.imread(args.image)
    if image is None:
        sys.exit(f"{args.image}: not an image cv2 can read")
    blob = cv2.dnn.blobFromImage(image, args.scale, (width, height), mean, swapRB=args.rgb)

    ours = caffe.Net(args.model, args.weights, caffe.TEST)
    input_name = ours.inputs[0]
    ours.reshape_blob(input_name, blob.shape)
    ours.reshape()
    with torch.no_grad():
        ours.forward(**{input_name: blob})

    theirs = cv2.dnn.readNetFromCaffe(args.model, args.weights)
    theirs.enableFusion(False)
    theirs.setInput(blob, input_name)
    # a blob's final value is the top of the last layer writing it (in-place layers rewrite it)
    last_writer = {}
    for layer in read_net(args.model).layer:
        for top in layer.top:
            last_writer[top] = layer.name
    known = set(theirs.getLayerNames())
    blobs = [b for b, layer in last_writer.items() if layer in known and b in ours.blobs]
    ref = dict(zip(blobs, theirs.forward([last_writer[b] for b in blobs])))
    names = blobs

    worst, ok = 0.0, True
    print(f"{'top':32} {'shape':20} {'max abs':>10} {'max rel':>10}")
    for name in names:
        a = ours.blobs[name].data
        b = np.asarray(ref[name])
        if name == args.output:
            continue
        if a.size != b.size:
            print(f"{name:32} shape {list(a.shape)} vs OpenCV {list(b.shape)}")
            ok = False
            continue
        err = float(np.abs(a - b.reshape(a.shape)).max())
        rel = err / max(float(np.abs(b).max()), 1e-30)
        worst = max(worst, rel)
        ok &= rel <= args.rtol
        print(f"{name:32} {'x'.join(map(str, a.shape)):20} {err:10.3g} {rel:10.3g}")
    if args.output not in ref:   # a net without a DetectionOutput top (e.g. boxes decoded in Python)
        print(f"\nworst relative error over {len(names)} tops: {worst:.3g}")
        return 0 if ok else 1
    det = ours.blobs[args.output].data.reshape(-1, 7)
    cv_det = np.asarray(ref[args.output]).reshape(-1, 7)
    cv_det = cv_det[np.any(cv_det != 0, axis=1)]   # OpenCV pads its output to keep_top_k rows with zeros
    same = detection_sets_equal(det, cv_det, args.det_tol)
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    print(f"\ncaffe_layers: {len(det)} detections\n{det}\nOpenCV {cv2.__version__}: {len(cv_det)} detections\n{cv_det}")
    gap = float(np.abs(np.sort(det, axis=0) - np.sort(cv_det, axis=0)).max()) if det.shape == cv_det.shape else None
    print(f"\nworst relative error over {len(names) - 1} tops: {worst:.3g}; detections equal as sets: {same}"
          + (f" (max row difference {gap:.3g})" if gap is not None else ""))
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
