"""A bounded, seeded slice of the reader fuzz campaign (caffe_layers/tools/fuzz.py): every mutated
input ends ok or in a clean error, none raw, none killing or hanging its process."""
import os
import signal
import time

import pytest

from caffe_layers.tools import fuzz

PER_READER = 30


@pytest.fixture(scope="module")
def results():
    return fuzz.fuzz(list(fuzz.TARGETS), PER_READER, seed=2026, timeout=20.0, examples=0)


@pytest.mark.parametrize("reader", sorted(fuzz.TARGETS))
def test_every_fuzzed_input_fails_cleanly(results, reader):
    r = results[reader]
    assert sum(r["counts"].values()) == PER_READER
    bad = {o: r["examples"].get(o) for o in ("unclean", "crash", "hang", "oom") if r["counts"][o]}
    assert not bad, f"{reader}: {dict(r['counts'])}: {bad}"
    assert r["counts"]["ok"] >= 1 and r["counts"]["clean"] >= 1  # the seeds load; mutants get refused


def _raw(path):
    raise IndexError("list index out of range")


def _ours(path):
    from caffe_layers.errors import DataError

    raise DataError(f"{path}: expected something else")


def _several_lines(path):
    from caffe_layers.errors import DataError

    raise DataError("first line\nsecond line")


def _raw_value_error(path):
    int("x")


def _hang(path):
    while True:
        pass


def _wait(path):  # a child waiting (for a CPU, on a busy machine) is not hanging: hangs count CPU time
    time.sleep(5)


def _die(path):
    os.kill(os.getpid(), signal.SIGSEGV)


def _allocate(path):
    bytearray(8 * 2**30)


@pytest.mark.parametrize("run,outcome", [(_raw, "unclean"), (_ours, "clean"), (_several_lines, "unclean"),
                                         (_raw_value_error, "unclean"), (_hang, "hang"), (_wait, "ok"), (_die, "crash"),
                                         (_allocate, "oom"), (lambda path: None, "ok")])
def test_the_engine_classifies(run, outcome):
    assert fuzz.run_isolated(run, "x", timeout=2.0, memory_mb=256)[0] == outcome


def test_the_mutations_are_seeded():
    import random

    data = fuzz.SEED_NETS[0].encode()
    one = [fuzz.mutate_text(random.Random(5), data) for _ in range(3)]
    two = [fuzz.mutate_text(random.Random(5), data) for _ in range(3)]
    assert one == two and any(m != data for m in one)
