"""Whole detection nets written with NetSpec, random weights, against OpenCV dnn 4.x's Caffe
importer (cv2.dnn.readNetFromCaffe on in-memory buffers): an SSD head on a small backbone and a
Faster R-CNN style head (Proposal, ROIPooling, PSROIPooling). Every top within 1e-4 relative,
detections equal as sets; `caffe-layers compare` passes on OpenCV's tops.
"""
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_layers as caffe
from caffe_layers import layers as L, params as P

cv2 = pytest.importorskip("cv2")  # opencv-python-headless<5 is in the test extra: a missing one fails (conftest)

XAVIER = dict(type="xavier")
BIAS = dict(type="gaussian", std=0.1)


def conv(bottom, num_output, kernel=3, stride=1, pad=1):
    return L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                         weight_filler=XAVIER, bias_filler=BIAS)


def ssd_net(num_classes=3, confidence_threshold=0.3):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 64]))
    n.conv1 = conv(n.data, 8, stride=2)
    n.relu1 = L.ReLU6(n.conv1)
    n.conv2 = conv(n.relu1, 8, stride=2)
    n.shuffle2 = L.ShuffleChannel(n.conv2, group=2)
    n.relu2 = L.ReLU(n.shuffle2)
    n.conv3 = conv(n.relu2, 16, stride=2)
    n.relu3 = L.ReLU(n.conv3)
    n.norm2 = L.Normalize(n.relu2, across_spatial=False, channel_shared=False,
                          scale_filler=dict(type="gaussian", mean=10, std=2))
    # clip is set explicitly: unset, OpenCV clips (its proto default) and the SSD fork does not
    heads = [("norm2", n.norm2, dict(min_size=[8, 12], max_size=[16, 20], aspect_ratio=[2], step=4, clip=False)),
             ("conv3", n.relu3, dict(min_size=[24], max_size=[40], aspect_ratio=[2, 3], flip=True, clip=True))]
    locs, confs, priors = [], [], []
    for name, fm, prior in heads:
        p = (len(prior["min_size"]) * (2 + 2 * len(prior["aspect_ratio"])))
        setattr(n, f"{name}_loc", conv(fm, p * 4))
        setattr(n, f"{name}_loc_perm", L.Permute(getattr(n, f"{name}_loc"), order=[0, 2, 3, 1]))
        setattr(n, f"{name}_loc_flat", L.Flatten(getattr(n, f"{name}_loc_perm"), axis=1))
        setattr(n, f"{name}_conf", conv(fm, p * num_classes))
        setattr(n, f"{name}_conf_perm", L.Permute(getattr(n, f"{name}_conf"), order=[0, 2, 3, 1]))
        setattr(n, f"{name}_conf_flat", L.Flatten(getattr(n, f"{name}_conf_perm"), axis=1))
        setattr(n, f"{name}_priorbox", L.PriorBox(fm, n.data, variance=[0.1, 0.1, 0.2, 0.2], **prior))
        locs.append(getattr(n, f"{name}_loc_flat"))
        confs.append(getattr(n, f"{name}_conf_flat"))
        priors.append(getattr(n, f"{name}_priorbox"))
    n.mbox_loc = L.Concat(*locs, axis=1)
    n.mbox_conf = L.Concat(*confs, axis=1)
    n.mbox_priorbox = L.Concat(*priors, axis=2)
    n.mbox_conf_reshape = L.Reshape(n.mbox_conf, shape=dict(dim=[0, -1, num_classes]))
    n.mbox_conf_softmax = L.Softmax(n.mbox_conf_reshape, axis=2)
    n.mbox_conf_flatten = L.Flatten(n.mbox_conf_softmax, axis=1)
    # as SSD's pycaffe scripts: a *_param keyword goes to the LayerParameter, so the whole message is given
    n.detection_out = L.DetectionOutput(
        n.mbox_loc, n.mbox_conf_flatten, n.mbox_priorbox, detection_output_param=dict(
            num_classes=num_classes, share_location=True, background_label_id=0,
            code_type=P.PriorBox.CENTER_SIZE, keep_top_k=40, confidence_threshold=confidence_threshold,
            nms_param=dict(nms_threshold=0.45, top_k=60)))
    return n.to_proto()


def rcnn_net():
    a = 6  # anchors: 2 ratios x 3 scales
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 64, 80]))
    n.im_info = L.Input(shape=dict(dim=[1, 3]))
    n.conv1 = conv(n.data, 8, stride=2)
    n.relu1 = L.ReLU(n.conv1)
    n.conv2 = conv(n.relu1, 18, stride=2)
    n.relu2 = L.ReLU(n.conv2)
    n.rpn_cls_score = conv(n.relu2, 2 * a, kernel=1, pad=0)
    n.rpn_cls_score_reshape = L.Reshape(n.rpn_cls_score, shape=dict(dim=[0, 2, -1, 0]))
    n.rpn_cls_prob = L.Softmax(n.rpn_cls_score_reshape)
    n.rpn_cls_prob_reshape = L.Reshape(n.rpn_cls_prob, shape=dict(dim=[0, 2 * a, -1, 0]))
    n.rpn_bbox_pred = conv(n.relu2, 4 * a, kernel=1, pad=0)
    n.rois = L.Proposal(n.rpn_cls_prob_reshape, n.rpn_bbox_pred, n.im_info, feat_stride=4, base_size=8,
                        min_size=4, ratio=[0.5, 2], scale=[1, 2, 4], pre_nms_topn=100, post_nms_topn=12,
                        nms_thresh=0.6)
    n.pool = L.ROIPooling(n.relu2, n.rois, pooled_h=3, pooled_w=3, spatial_scale=0.25)
    n.fc = L.InnerProduct(n.pool, num_output=16, weight_filler=XAVIER, bias_filler=BIAS)
    n.cls_score = L.InnerProduct(n.fc, num_output=4, weight_filler=XAVIER, bias_filler=BIAS)
    n.cls_prob = L.Softmax(n.cls_score)
    n.psroi = L.PSROIPooling(n.relu2, n.rois, spatial_scale=0.25, output_dim=2, group_size=3)
    n.bbox_pred = L.InnerProduct(n.psroi, num_output=8, weight_filler=XAVIER, bias_filler=BIAS)
    return n.to_proto()


def build(proto, tmp_path, seed):
    torch.manual_seed(seed)
    text = text_format.MessageToString(proto)
    net = caffe.Net(text, caffe.TEST)
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    ours = caffe.Net(text, str(weights), caffe.TEST)
    theirs = cv2.dnn.readNetFromCaffe(np.frombuffer(text.encode(), np.uint8),
                                      np.frombuffer(weights.read_bytes(), np.uint8))
    theirs.enableFusion(False)
    theirs.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    return text, weights, ours, theirs


def run_both(ours, theirs, inputs, names):
    for name, value in inputs.items():
        theirs.setInput(value, name)
    cv_out = dict(zip(names, theirs.forward(names)))
    ours.forward(**{k: v for k, v in inputs.items()})
    return {k: ours.blobs[k].data.copy() for k in names}, cv_out


def assert_close(ours, ref, name):
    ref = np.asarray(ref).reshape(ours.shape) if np.asarray(ref).size == ours.size else ref
    assert ours.shape == np.shape(ref), f"{name}: shape {ours.shape} vs OpenCV {np.shape(ref)}"
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4 * scale + 1e-6, f"{name}: max abs error {err:.3g}, max |OpenCV| {scale:.3g}"


def assert_same_detections(ours, theirs, atol=1e-4):
    """Equal as sets: every row of ours matches a distinct row of OpenCV's within atol, and none is left."""
    ours, theirs = np.asarray(ours).reshape(-1, 7), np.asarray(theirs).reshape(-1, 7)
    theirs = theirs[np.any(theirs != 0, axis=1)]   # OpenCV pads its top to keep_top_k rows with zeros
    assert len(ours) == len(theirs), f"{len(ours)} detections vs OpenCV's {len(theirs)}"
    unused = list(range(len(theirs)))
    for row in ours:
        hit = next((j for j in unused if np.allclose(row, theirs[j], rtol=0, atol=atol)), None)
        assert hit is not None, f"detection {row} has no match in OpenCV's"
        unused.remove(hit)


def compared_tops(proto):
    return [l.top[0] for l in proto.layer if l.type not in ("Input", "DetectionOutput", "Proposal")]


@pytest.mark.parametrize("seed", [0, 1])
def test_ssd_head_matches_opencv(tmp_path, seed):
    proto = ssd_net()
    _, _, ours, theirs = build(proto, tmp_path, seed)
    image = np.random.default_rng(seed).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    names = compared_tops(proto) + ["detection_out"]
    mine, cv_out = run_both(ours, theirs, {"data": image}, names)
    for name in names[:-1]:
        assert_close(mine[name], cv_out[name], name)
    det, cv_det = mine["detection_out"], cv_out["detection_out"]
    assert det.shape[:2] == (1, 1) and det.shape[2] > 3, "the test net should detect something"
    assert det.shape == cv_det.shape
    ours_rows, cv_rows = np.sort(det.reshape(-1, 7), axis=0), np.sort(cv_det.reshape(-1, 7), axis=0)
    np.testing.assert_allclose(ours_rows, cv_rows, rtol=1e-4, atol=1e-5)
    assert_same_detections(det, cv_det)


def test_ssd_head_runs_at_a_new_input_size(tmp_path):
    proto = ssd_net()
    proto.layer[0].input_param.shape[0].dim[2:] = [96, 80]
    _, _, ours, theirs = build(proto, tmp_path, 3)
    image = np.random.default_rng(3).uniform(-1, 1, (1, 3, 96, 80)).astype(np.float32)
    mine, cv_out = run_both(ours, theirs, {"data": image}, ["mbox_priorbox", "detection_out"])
    assert_close(mine["mbox_priorbox"], cv_out["mbox_priorbox"], "mbox_priorbox")
    assert_same_detections(mine["detection_out"], cv_out["detection_out"])


def test_rcnn_head_matches_opencv(tmp_path):
    proto = rcnn_net()
    _, _, ours, theirs = build(proto, tmp_path, 5)
    rng = np.random.default_rng(5)
    inputs = {"data": rng.uniform(-1, 1, (1, 3, 64, 80)).astype(np.float32),
              "im_info": np.array([[64, 80, 1.0]], np.float32)}
    names = compared_tops(proto) + ["rois"]
    mine, cv_out = run_both(ours, theirs, inputs, names)
    rois, cv_rois = mine["rois"], np.asarray(cv_out["rois"]).reshape(-1, 5)
    assert len(rois) == 12
    np.testing.assert_allclose(rois, cv_rois, rtol=1e-4, atol=1e-3)
    for name in names[:-1]:
        assert_close(mine[name], cv_out[name], name)


def test_compare_tool_on_opencv_tops(tmp_path, capsys):
    from caffe_layers.tools.cli import main
    proto = ssd_net()
    text, weights, ours, theirs = build(proto, tmp_path, 0)
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    names = compared_tops(proto) + ["detection_out"]
    _, cv_out = run_both(ours, theirs, {"data": image}, names)
    ref = tmp_path / "opencv.npz"
    np.savez(ref, data=image, **{k: np.asarray(v) for k, v in cv_out.items()})
    model = tmp_path / "ssd.prototxt"
    model.write_text(text)
    assert main(["compare", str(model), str(weights), "--reference", str(ref), "--rtol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "all within tolerance" in out and "detection_out" in out


def test_detection_count_changes_between_forwards(tmp_path):
    _, _, ours, theirs = build(ssd_net(confidence_threshold=0.9999), tmp_path, 0)
    counts = []
    for seed, amplitude in ((0, 1.0), (1, 0.3)):
        image = np.random.default_rng(seed).uniform(-amplitude, amplitude, (1, 3, 64, 64)).astype(np.float32)
        mine, cv_out = run_both(ours, theirs, {"data": image}, ["detection_out"])
        assert_same_detections(mine["detection_out"], cv_out["detection_out"])
        counts.append(mine["detection_out"].shape[2])
    assert counts[0] != counts[1], counts
