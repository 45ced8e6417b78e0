"""SPNDataLayer: the data layer of the SPN VOC refinement net, a pycaffe-style Python layer.

Replaces caffe-spn's pylayers/vocspn_datalayer.py (AgRcProbVOCDataLayer). Tops:
  data  (N, 3 + K, h, w): BGR image minus the mean, then the K coarse class probabilities
  label (N, 1, h, w): VOC class indices (255 = ignore)
Each batch takes N / patch_num images and patch_num random h x w crops of each; a crop showing a
single class is redrawn up to 10 times when the image has two or more classes (as the original).

Files under voc_dir: ImageSets/Segmentation/<split>.txt, JPEGImages/<id>.jpg,
SegmentationClass/<id>.png (palette indices), SegmentationProb/<id>.mat (variable `out`, K x H x W).
param_str: a Python dict with voc_dir, split, mean (B, G, R), shape (N, C, h, w), patch_num,
randomize (default True for train splits), seed.

Deviations from the original: no random affine jitter (rotation, scale, shift); the batch index
uses patch_num where the original hard-codes 10; images smaller than 1.2x the crop are resized to it
(labels nearest-neighbour, the original's bilinear on a palette image is nearest in Pillow too).
"""
import ast
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


class SPNDataLayer:
    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self.voc_dir = Path(params["voc_dir"])
        self.split = params.get("split", "train")
        self.mean = np.array(params["mean"], dtype=np.float32)
        self.shape = tuple(int(s) for s in params["shape"])
        self.patch_num = int(params.get("patch_num", 10))
        self.random = bool(params.get("randomize", "train" in self.split))
        self.rng = np.random.RandomState(params.get("seed", None))
        if len(top) != 2:
            raise ValueError("SPNDataLayer: needs two tops, data and label")
        if len(bottom) != 0:
            raise ValueError("SPNDataLayer: takes no bottoms")
        if len(self.shape) != 4 or self.shape[0] % self.patch_num:
            raise ValueError(f"SPNDataLayer: shape {self.shape} must be (N, C, h, w) with N a multiple of "
                             f"patch_num {self.patch_num}")
        split_file = self.voc_dir / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"SPNDataLayer: no split file {split_file}")
        self.indices = [s for s in split_file.read_text().splitlines() if s.strip()]
        self.images_per_batch = self.shape[0] // self.patch_num
        self.cursor = 0

    def reshape(self, bottom, top):
        top[0].reshape(*self.shape)
        top[1].reshape(self.shape[0], 1, self.shape[2], self.shape[3])

    def forward(self, bottom, top):
        data = np.zeros(self.shape, np.float32)
        label = np.zeros((self.shape[0], 1) + self.shape[2:], np.float32)
        for i in range(self.images_per_batch):
            if self.random:
                name = self.indices[self.rng.randint(len(self.indices))]
            else:
                name = self.indices[self.cursor % len(self.indices)]
                self.cursor += 1
            image, lab = self.load(name)
            rows = slice(i * self.patch_num, (i + 1) * self.patch_num)
            data[rows], label[rows] = self.crops(image, lab)
        top[0].data[...] = data
        top[1].data[...] = label

    def backward(self, top, propagate_down, bottom):
        pass

    def load(self, name):
        """(H, W, 3 + K) float32 image with priors, (H, W) uint8 label."""
        h, w = self.shape[2:]
        min_w, min_h = int(1.2 * w), int(1.2 * h)
        im = Image.open(self.voc_dir / "JPEGImages" / f"{name}.jpg").convert("RGB")
        lb = Image.open(self.voc_dir / "SegmentationClass" / f"{name}.png")
        prob = np.asarray(scipy.io.loadmat(self.voc_dir / "SegmentationProb" / f"{name}.mat")["out"], np.float32)
        if prob.shape[1:] != (im.size[1], im.size[0]):
            raise ValueError(f"SPNDataLayer: {name}.mat 'out' is {prob.shape}, expected K x {im.size[1]} x {im.size[0]}")
        if 3 + prob.shape[0] != self.shape[1]:
            raise ValueError(f"SPNDataLayer: {name}: 3 + {prob.shape[0]} channels, shape says {self.shape[1]}")
        small = im.size[0] < min_w or im.size[1] < min_h
        if small:
            im = im.resize((min_w, min_h), Image.BILINEAR)
            lb = lb.resize((min_w, min_h), Image.NEAREST)
            prob = np.stack([np.asarray(Image.fromarray(p).resize((min_w, min_h), Image.BILINEAR)) for p in prob])
        image = np.asarray(im, np.float32)[:, :, ::-1] - self.mean  # RGB -> BGR, as Caffe models expect
        return np.concatenate([image, prob.transpose(1, 2, 0)], axis=2), np.asarray(lb, np.uint8)

    def crops(self, image, label):
        h, w = self.shape[2:]
        H, W = label.shape
        several = len(np.unique(label[label < 21])) >= 2
        data = np.zeros((self.patch_num, image.shape[2], h, w), np.float32)
        labels = np.zeros((self.patch_num, 1, h, w), np.float32)
        count = retries = 0
        while count < self.patch_num:
            y, x = int(self.rng.rand() * (H - h)), int(self.rng.rand() * (W - w))
            patch = label[y:y + h, x:x + w]
            if several and len(np.unique(patch[patch < 21])) < 2 and retries < 10:
                retries += 1
                continue
            retries = 0
            data[count] = image[y:y + h, x:x + w].transpose(2, 0, 1)
            labels[count, 0] = patch
            count += 1
        return data, labels


def make_sample(root, n_images=3, size=(40, 48), classes=21, seed=0, split="train"):
    """Write a tiny VOC-style folder of random images, labels and coarse probabilities; returns root."""
    rng = np.random.RandomState(seed)
    root = Path(root)
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass", "SegmentationProb"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i:03d}" for i in range(n_images)]
    H, W = size
    for name in names:
        Image.fromarray(rng.randint(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        lab = np.zeros((H, W), np.uint8)
        lab[H // 4:3 * H // 4, W // 4:3 * W // 4] = rng.randint(1, classes)
        lab[H // 2, :] = 255
        png = Image.fromarray(lab, mode="P")
        png.putpalette([v for i in range(256) for v in (i, i, i)])
        png.save(root / "SegmentationClass" / f"{name}.png")
        logits = rng.rand(classes, H, W).astype(np.float32)
        scipy.io.savemat(root / "SegmentationProb" / f"{name}.mat", {"out": logits / logits.sum(0)})
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root
