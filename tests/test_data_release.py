"""Data layers let go of their prefetch threads and LMDB environments when closed or dropped."""
import threading

import numpy as np
import pytest

import caffe_layers as caffe
from caffe_layers.formats.proto import TRAIN, pb
from caffe_layers.training import data as shared_data


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("prefetch-")]


@pytest.fixture
def lmdb_net(tmp_path):
    """A net reading a 5-record LMDB (labels 0..4) in batches of 2."""
    import lmdb

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for i in range(5):
            datum = pb.Datum(channels=1, height=2, width=2, label=i, data=bytes([i] * 4))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    path = tmp_path / "net.prototxt"
    path.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" data_param {{ '
                    f'source: "{tmp_path}/db" batch_size: 2 backend: LMDB }} }}\n')
    return str(path)


def labels(net, n):
    return [net.forward()["label"].tolist() for _ in range(n)]


def finished(threads):
    """Wait for threads that were told to stop (one dropped while prefetching stops after that batch)."""
    for t in threads:
        t.join(timeout=30)
    return not any(t.is_alive() for t in threads)


def test_dropped_nets_leave_no_thread_and_no_environment(lmdb_net):
    before = set(prefetch_threads())
    started = set()
    for _ in range(100):
        net = caffe.Net(lmdb_net, TRAIN)
        assert labels(net, 1) == [[0, 1]]
        started |= set(prefetch_threads()) - before
        del net  # dropped: no close() called
    assert len(started) == 100 and finished(started)
    assert set(prefetch_threads()) == before
    assert shared_data._lmdb_envs == {}


def test_two_nets_on_one_lmdb_read_independently(lmdb_net):
    first = caffe.Net(lmdb_net, TRAIN)
    second = caffe.Net(lmdb_net, TRAIN)  # LMDB allows one environment per process: it is shared
    assert labels(first, 2) == [[0, 1], [2, 3]]
    assert labels(second, 3) == [[0, 1], [2, 3], [4, 0]]
    first.close()
    assert labels(second, 1) == [[1, 2]]  # the environment stays open for the other user
    second.close()
    assert shared_data._lmdb_envs == {}
    third = caffe.Net(lmdb_net, TRAIN)  # and opens again after the last user closed it
    assert labels(third, 1) == [[0, 1]]
    third.close()


def test_close_and_context_manager(lmdb_net):
    before = len(prefetch_threads())
    with caffe.Net(lmdb_net, TRAIN) as net:
        labels(net, 1)
        layer = net.layer_modules[0]
        assert not layer.closed and len(prefetch_threads()) == before + 1
    assert layer.closed and len(prefetch_threads()) == before
    with pytest.raises(RuntimeError, match="layer 'd': the data layer is closed"):
        net.forward()
    layer.close()  # closing twice is harmless
    with caffe.Net(lmdb_net, TRAIN).layer_modules[0] as bare:
        assert bare.next_batch()[1].tolist() == [0, 1]
    assert bare.closed and shared_data._lmdb_envs == {}


def test_a_closed_layer_waiting_on_a_full_queue_stops(lmdb_net):
    net = caffe.Net(lmdb_net, TRAIN)
    layer = net.layer_modules[0]
    layer.next_batch()
    thread = layer._prefetch.thread
    while not layer._prefetch.queue.full():  # the thread now waits for room
        thread.join(0.01)
    net.close()
    assert not thread.is_alive()


def test_two_solvers_on_one_lmdb(lmdb_net, tmp_path):
    net = tmp_path / "train.prototxt"
    net.write_text(open(lmdb_net).read() + 'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                   'inner_product_param { num_output: 5 } }\n'
                   'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 3 display: 0\n')
    a, b = caffe.SGDSolver(str(solver)), caffe.SGDSolver(str(solver))
    a.step(2)
    b.step(3)
    assert (a.iter, b.iter) == (2, 3)
    a.close()
    b.close()
    assert shared_data._lmdb_envs == {} and not np.isnan(b.net.params["ip"][0].data).any()
