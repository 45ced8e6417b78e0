"""pycaffe's caffe.Detector: a Net that classifies windows cropped from images (R-CNN style), with
optional context padding around each window."""
import os

import numpy as np

from caffe_layers.formats.proto import TEST
from caffe_layers.pycaffe import io
from caffe_layers.pycaffe.classifier import configured_transformer
from caffe_layers.pycaffe.pycaffe import Net, forward_all


class Detector(Net):
    """Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, pretrained_file, TEST)
        self.transformer = configured_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{window, prediction, filename}] for each (image filename, [window (ymin, xmin, ymax, xmax)])."""
        crops = []
        for filename, windows in images_windows:
            image = io.load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        batch = np.zeros((len(crops), crops[0].shape[2]) + self.blobs[name].data.shape[2:], dtype=np.float32)
        for i, crop in enumerate(crops):
            batch[i] = self.transformer.preprocess(name, crop)
        predictions = forward_all(self, **{name: batch})[self.outputs[0]]
        detections, i = [], 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[i], "filename": filename})
                i += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """Windows from selective_search_ijcv_with_python (which runs MATLAB), as pycaffe does."""
        import selective_search_ijcv_with_python as selective_search

        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(list(zip(image_fnames, windows)))

    def crop(self, im, window):
        """The window of an HxWxK image; with context_pad, widened so that a context_pad border of the
        net input is context, the part outside the image filled with the mean."""
        crop = im[window[0]:window[2], window[1]:window[3]]
        if not self.context_pad:
            return crop
        box = np.array(window, dtype=float)
        size = self.blobs[self.inputs[0]].width  # square inputs, as pycaffe assumes
        scale = size / (1.0 * size - self.context_pad * 2)
        half_h, half_w = (box[2] - box[0] + 1) / 2.0, (box[3] - box[1] + 1) / 2.0
        center = (box[0] + half_h, box[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h, scale_w = size / (box[2] - box[0] + 1), size / (box[3] - box[1] + 1)
        pad_y, pad_x = int(round(max(0, -box[0]) * scale_h)), int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        assert clip_h > 0 and clip_w > 0
        crop_h = min(int(round(clip_h * scale_h)), size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), size - pad_x)
        box = box.astype(int)  # pycaffe indexes with the float box (old numpy truncated it)
        context = io.resize_image(im[box[0]:box[2], box[1]:box[3]], (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad):
        """crop_dims (HxWxK of the input) and, with context padding, the mean in raw image space."""
        name = self.inputs[0]
        order = self.transformer.transpose[name]
        inverse = [order[t] for t in order]  # as pycaffe (right for its (2, 0, 1) transpose)
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = mean.copy().transpose(inverse)
        channel_order = self.transformer.channel_swap.get(name)
        if channel_order is not None:
            crop_mean = crop_mean[:, :, [list(channel_order).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(name)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
