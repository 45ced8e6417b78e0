"""Data: Datum records from an LMDB database (data_param.source, backend LMDB)."""
from functools import partial

import numpy as np

from caffe_layers.training.data import DataLayer, release_lmdb, shared_lmdb
from caffe_layers.training.data.transformer import Transformer
from caffe_layers.layers import register
from caffe_layers.formats.proto import pb


def datum_image(datum, force_color=False, force_gray=False):
    """A Datum as HxWxC (uint8 or float) in the stored channel order."""
    if datum.encoded:
        import io

        from PIL import Image
        img = Image.open(io.BytesIO(datum.data))
        gray = force_gray or (img.mode in ("L", "P") and not force_color)
        a = np.asarray(img.convert("L" if gray else "RGB"))
        return a[:, :, None] if gray else a[:, :, ::-1]  # OpenCV decodes to BGR
    c, h, w = datum.channels, datum.height, datum.width
    if len(datum.data):
        chw = np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
    else:
        chw = np.asarray(datum.float_data, np.float32).reshape(c, h, w)
    return chw.transpose(1, 2, 0)


@register("Data")
class Data(DataLayer):
    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.data_param
        if p.backend != pb.DataParameter.LMDB:
            raise ValueError(f"layer {self.name!r}: only backend LMDB is supported")
        try:
            import lmdb
        except ImportError:
            raise ImportError(f"layer {self.name!r}: the Data layer needs the `lmdb` package") from None
        try:
            self.env = shared_lmdb(p.source)
        except lmdb.Error as err:
            raise ValueError(f"layer {self.name!r}: cannot open LMDB {p.source!r}: {err}") from None
        self.on_close(partial(release_lmdb, p.source))
        self.batch_size = p.batch_size
        self.tp = param.transform_param
        self.transform = Transformer(self.tp, phase, self.rng, self.name)
        self.txn = self.env.begin()
        self.cursor = self.txn.cursor()
        self._closers.insert(0, self.txn.abort)  # before the environment goes
        if not self.cursor.first():
            raise ValueError(f"layer {self.name!r}: LMDB {p.source!r} is empty")
        if p.rand_skip:
            for _ in range(self.rng.randint(p.rand_skip)):
                self._next_datum()
        img = datum_image(self._peek(), self.tp.force_color, self.tp.force_gray)
        c, h, w = self.transform.out_shape(img.shape[2], *img.shape[:2])
        self.shapes = [(self.batch_size, c, h, w), (self.batch_size,)][:len(param.top)]

    def _peek(self):
        datum = pb.Datum()
        datum.ParseFromString(self.cursor.value())
        return datum

    def _next_datum(self):
        datum = self._peek()
        if not self.cursor.next():
            self.cursor.first()  # loop around, as Caffe's DataReader
        return datum

    def load_batch(self):
        data, labels = [], []
        for _ in range(self.batch_size):
            datum = self._next_datum()
            data.append(self.transform(datum_image(datum, self.tp.force_color, self.tp.force_gray)))
            labels.append(datum.label)
        return [np.stack(data), np.asarray(labels, np.float32)][:len(self.shapes)]
