"""Machinery shared by the data layers: a base class with background prefetch, sharding for
data-parallel training, list files and the data transformer.

A data layer lets go of its prefetch thread and what it opened (LMDB transactions and environments)
when it is closed (`layer.close()`, `with layer:`, `net.close()`, `with Net(...) as net:`) or garbage
collected (a weakref.finalize; the thread holds the layer only weakly, between batches).
"""
import os
import queue
import re
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from caffe_layers.engine.explicit import TopReshaped
from caffe_layers.errors import DataError, TopReshaped
from caffe_layers.training.data.transformer import read_image
from caffe_layers.layers.base import Layer

PREFETCH_COUNT = 3  # Caffe's BasePrefetchingDataLayer keeps three batches ready
_POLL_S = 0.1  # how often a prefetch thread waiting for room in its queue checks whether to stop


class _Prefetch:
    """The state a prefetch thread and the layer's finalizer share (never the layer itself)."""

    def __init__(self):
        self.queue, self.thread, self.stop = None, None, threading.Event()


def _prefetch_loop(layer_ref, state):
    while not state.stop.is_set():
        layer = layer_ref()
        if layer is None:
            return
        try:
            item = layer._produce()
        except BaseException as err:  # handed to the consumer, which raises it
            item = err
        del layer  # hold the layer only while producing, so that dropping its net frees it
        while not state.stop.is_set():
            try:
                state.queue.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return


def _shutdown(state, closers):
    """Stop the prefetch thread, then release the layer's resources in order (once)."""
    state.stop.set()
    if state.thread is not None and state.thread is not threading.current_thread():
        state.thread.join()
    for close in closers:
        close()


_lmdb_envs, _lmdb_lock = {}, threading.Lock()


def shared_lmdb(source):
    """A read-only LMDB environment for `source`, shared by every layer that reads it in this process
    (LMDB allows one per process); give it back with release_lmdb(source)."""
    import lmdb

    key = os.path.realpath(source)
    with _lmdb_lock:
        if key in _lmdb_envs:
            env, users = _lmdb_envs[key]
        else:
            env, users = lmdb.open(source, readonly=True, lock=False, subdir=True), 0
        _lmdb_envs[key] = (env, users + 1)
        return env


def release_lmdb(source):
    """One user fewer of shared_lmdb(source); the last one closes the environment."""
    key = os.path.realpath(source)
    with _lmdb_lock:  # closed inside the lock: a layer opening it again meanwhile must wait
        env, users = _lmdb_envs.pop(key)
        if users > 1:
            _lmdb_envs[key] = (env, users - 1)
        else:
            env.close()


class DataLayer(Layer):
    """A layer without bottoms whose forward returns the next batch.

    A subclass sets `self.shapes` (top shapes) in __init__ and implements `load_batch()`, returning
    one numpy array per top (views of arrays it keeps where `batch_views` is set: they are copied into the
    tops); it is called in order from one background thread, so it may keep a cursor. With `set_shard(rank, world)` each of `world` processes reads every world-th batch,
    starting at its rank, so k processes see the batches one process would see in k steps.
    A list-file layer (image_data_param in `self.ip`) sets its cursor with `_start_list`, moves it
    with `_advance` and reads an entry's image with `_read_image`.
    """

    is_data_layer = True
    prefetch = PREFETCH_COUNT
    batch_views = False

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        if bottom_shapes:
            raise ValueError(f"layer {self.name!r} ({param.type}): a data layer takes no bottoms")
        self.register_buffer("_like", torch.empty(0), persistent=False)
        self.rank, self.world = 0, 1
        self._started = False
        self._prefetch, self._closers = _Prefetch(), []
        self._finalizer = weakref.finalize(self, _shutdown, self._prefetch, self._closers)
        seed = torch.initial_seed() % (2 ** 32)
        self.rng = np.random.RandomState(seed)  # shuffles, crops, mirrors

    def top_shapes(self, bottom_shapes):
        return [tuple(s) for s in self.shapes]

    def set_shard(self, rank, world):
        if self._started:
            raise RuntimeError(f"layer {self.name!r}: set_shard must come before the first batch")
        self.rank, self.world = int(rank), int(world)

    def load_batch(self):
        raise NotImplementedError

    def on_close(self, release):
        """Call `release()` (which must not refer to the layer) when the layer is closed or collected;
        releases run after the prefetch thread stopped, in the order given."""
        self._closers.append(release)

    def close(self):
        self._finalizer()

    @property
    def closed(self):
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start_list(self, lines, noun):
        """Keep `lines` (the list file's entries) and set the cursor as Caffe does: shuffle if
        image_data_param.shuffle, then start at a random draw below rand_skip. `noun` names the
        entries in the error."""
        p = self.ip
        self.lines = lines
        if p.shuffle:
            self.rng.shuffle(self.lines)
        self.pos = self.rng.randint(p.rand_skip) if p.rand_skip else 0
        if self.pos >= len(self.lines):
            raise DataError(f"layer {self.name!r}: rand_skip {p.rand_skip} exceeds the {len(self.lines)} {noun}")

    def _read_image(self, i):
        """The image named in the first column of entry i, read as image_data_param says."""
        p = self.ip
        return read_image(p.root_folder + self.lines[i][0], p.new_height, p.new_width, p.is_color, self.name)

    def _advance(self):
        """Move the cursor to the next entry; past the last, back to the first, reshuffled if asked."""
        self.pos += 1
        if self.pos >= len(self.lines):
            self.pos = 0
            if self.ip.shuffle:
                self.rng.shuffle(self.lines)

    def _produce(self):
        if not self._started:
            self._started = True
            for _ in range(self.rank):
                self.load_batch()
        else:
            for _ in range(self.world - 1):
                self.load_batch()
        return self.load_batch()

    def next_batch(self):
        if self.closed:
            raise RuntimeError(f"layer {self.name!r}: the data layer is closed")
        if not self.prefetch:
            return self._produce()
        state = self._prefetch
        if state.thread is None:
            state.queue = queue.Queue(maxsize=self.prefetch)
            state.thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), state),
                                            name=f"prefetch-{self.name}", daemon=True)
            state.thread.start()
        item = state.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"layer {self.name!r}: loading a batch failed: {item}") from item
        return item

    def forward(self):
        tops = self._as_tops(self.next_batch())
        return tops if len(tops) != 1 else tops[0]

    def _as_tops(self, arrays):
        like = self._like
        dtype = like.dtype if like.is_floating_point() else torch.float32
        if self.batch_views:  # (a top may be written in place: never the layer's own arrays)
            arrays = [np.array(a) for a in arrays]
        return tuple(_as_top(a, like.device, dtype) for a in arrays)

    def caffe_forward(self, bottoms, tops):
        """The next batch copied into the tops' tensors (engine/explicit.py); a batch of another shape raises
        TopReshaped for the net to reshape its blobs."""
        arrays = self.next_batch()
        for top, array in zip(tops, arrays):
            if top.shape != array.shape:
                raise TopReshaped(self._as_tops(arrays))
        for top, array in zip(tops, arrays):
            if top.is_cpu:
                np.copyto(top.numpy(), array, casting="unsafe")
            else:
                top.copy_(torch.as_tensor(np.ascontiguousarray(array)))


def _as_top(array, device, dtype):
    """A batch array as a top tensor (no copy where it already is one on the CPU)."""
    top = torch.as_tensor(np.ascontiguousarray(array))
    return top if top.dtype == dtype and top.device == device else top.to(device=device, dtype=dtype)


def read_list_lines(source, layer_name):
    """[(line number, text)] of the non-blank lines of a list file; errors name the layer and the file."""
    path = Path(source)
    if path.is_dir():
        raise FileNotFoundError(f"layer {layer_name!r}: source list {source!r} is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"layer {layer_name!r}: cannot open source list {source!r}")
    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"layer {layer_name!r}: {source}:{n}: not UTF-8 text ({err.reason} at "
                            f"column {err.start + 1})") from err
        if text.strip():
            lines.append((n, text))
    if not lines:
        raise DataError(f"layer {layer_name!r}: source list {source!r} is empty")
    return lines


def read_list(source, layer_name, columns=None):
    """The lines of a list file split on whitespace; errors name the layer and the file."""
    rows = [(n, text.split()) for n, text in read_list_lines(source, layer_name)]
    if columns is not None:
        for n, row in rows:
            if len(row) < columns:
                raise DataError(f"layer {layer_name!r}: {source}:{n}: expected {columns} columns, "
                                f"got {' '.join(row)!r}")
    return [row for _, row in rows]


def read_labelled_list(source, layer_name):
    """[(path, integer label)] of an ImageData list: as BVLC's ImageDataLayer, each line is split at
    its last space (or tab), so paths may hold spaces; a line without one is a path with label 0. A
    label that is not an integer is an error naming its line (Caffe's atoi would read it as 0)."""
    entries = []
    for n, text in read_list_lines(source, layer_name):
        text = text.strip()
        match = re.fullmatch(r"(.*\S)\s+(\S+)", text)
        if match is None:
            entries.append((text, 0))
            continue
        try:
            label = int(match.group(2))
        except ValueError:
            raise DataError(f"layer {layer_name!r}: {source}:{n}: expected 'path label' with an integer "
                            f"label, got {text!r}") from None
        entries.append((match.group(1), label))
    return entries


def resolve(path, list_file):
    """A path from a list file: as given (Caffe: relative to the working directory), else
    relative to the list file's folder."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    beside = Path(list_file).parent / p
    return beside if beside.exists() else p
