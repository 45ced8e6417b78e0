"""MatWrite (segaware / DeepLab v2): writes each bottom to a .mat file every `period` forwards.

File names: prefix + name + "_blob_<i>.mat" for bottom i, with name the iteration's entry of the
`source` list (first token per line, less `strip` characters) or "iter_<k>" without a source. The
counter counts every forward; the list must not run out. As in the original, an existing file is
never overwritten: it is skipped (with a log message) and left as it is.
"""
import logging
from pathlib import Path

from caffe_layers.layers import register
from caffe_layers.layers.base import Layer
from caffe_layers.layers.mat_read import read_name_list
from caffe_layers.formats.matio import write_blob_mat

log = logging.getLogger(__name__)


@register("MatWrite")
class MatWrite(Layer):
    exact_tops = 0

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        p = param.mat_write_param
        if p.period <= 0:
            raise ValueError(f"MatWrite layer {self.name!r}: period must be positive, got {p.period}")
        self.prefix, self.period = p.prefix, p.period
        self.names = read_name_list(p.source, p.strip, f"MatWrite layer {self.name!r}") if p.HasField("source") else None
        self.iter = 0

    def top_shapes(self, bottom_shapes):
        return []

    def forward(self, *bottoms):
        if self.iter % self.period == 0:
            for i, bottom in enumerate(bottoms):
                if self.names is not None:
                    if self.iter >= len(self.names):
                        raise RuntimeError(f"MatWrite layer {self.name!r}: forward {self.iter + 1} but the source "
                                           f"lists only {len(self.names)} names (the test ran too long)")
                    name = self.names[self.iter]
                else:
                    name = f"iter_{self.iter}"
                path = Path(f"{self.prefix}{name}_blob_{i}.mat")
                if path.exists():
                    log.info("MatWrite %s: %s exists, skipped", self.name, path)
                else:
                    write_blob_mat(path, bottom.detach().cpu().numpy())
        self.iter += 1
        return ()
