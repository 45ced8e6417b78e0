"""The command line as Caffe's: gflags spellings, TRAIN/TEST, device_query, --version, solver_mode: GPU,
one-line errors, and a segaware driver script calling `${CAFFE_BIN} test ...` after its sed substitution."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from caffe_layers.tools.cli import build_parser, main, normalize

NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 1 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path}/net.prototxt" base_lr: 0.1 lr_policy: "fixed" '
                                              f'max_iter: 2 display: 1 snapshot_prefix: "{tmp_path}/s"\n')
    (tmp_path / "gpu_solver.prototxt").write_text((tmp_path / "solver.prototxt").read_text()
                                                  + "solver_mode: GPU device_id: 1\n")
    return tmp_path


@pytest.mark.parametrize("argv,expected", [
    (["-solver", "s.prototxt", "train"], ["train", "--solver", "s.prototxt"]),
    (["train", "-solver=s.prototxt", "-gpu", "0"], ["train", "--solver=s.prototxt", "--gpu", "0"]),
    (["--weights=w", "-model", "m", "test", "--iterations", "3"], ["test", "--weights=w", "--model", "m",
                                                                     "--iterations", "3"]),
    (["train", "--no-progress", "-debug", "-solver", "s"], ["--debug", "train", "--no-progress", "--solver", "s"]),
    (["-version"], ["--version"]),
    (["draw", "m.prototxt", "-o", "x.png"], ["draw", "m.prototxt", "-o", "x.png"]),  # short options stay
    (["--debug", "run", "-m", "pytest", "-q", "-x", "--debug"], ["--debug", "run", "-m", "pytest", "-q", "-x",
                                                                "--debug"]),  # the script's arguments: as given
])
def test_gflags_spellings(argv, expected):
    _, subparsers = build_parser()
    assert normalize(argv, subparsers) == expected


def test_stages_comma_separated_or_repeated():
    from caffe_layers.tools.train import stages

    assert stages(["a,b", "c"]) == ["a", "b", "c"] and stages([]) == []


def test_flags_before_the_command_and_caffe_phase(files, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["-solver", str(files / "solver.prototxt"), "train", "-no-progress"]) == 0
    assert "Iteration 1, loss" in caplog.text
    model = str(files / "net.prototxt")
    for phase in ("TRAIN", "TEST", "test"):
        assert main(["time", "-model", model, "-phase", phase, "-iterations=1"]) == 0


def test_bad_phase_is_refused(files, capsys):
    with pytest.raises(SystemExit):
        main(["time", "--model", str(files / "net.prototxt"), "--phase", "VAL"])
    assert "invalid choice: 'VAL'" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("caffe-layers version ")


def test_errors_are_one_line(files, capsys):
    assert main(["test", "-model", str(files / "missing.prototxt"), "-weights", "w", "-iterations", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("caffe-layers test: error: ") and "missing.prototxt" in err
    assert main(["time", "-model", str(files / "solver.prototxt")]) == 1  # not a net: one line too
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(Exception):
        main(["-debug", "time", "-model", str(files / "solver.prototxt")])


def test_solver_mode_gpu_without_a_gpu(files, monkeypatch, capsys, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    solver = str(files / "gpu_solver.prototxt")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-solver", solver, "-no-progress"])
    assert str(exit_.value) == (f"solver {solver}: solver_mode: GPU (device 1): no CUDA device is available to "
                                f"torch; set CAFFE_LAYERS_CPU_FALLBACK=1 to run on the CPU instead")
    monkeypatch.setenv("CAFFE_LAYERS_CPU_FALLBACK", "1")
    with caplog.at_level(logging.INFO):
        assert main(["train", "-solver", solver, "-no-progress"]) == 0
    assert "running on the CPU (CAFFE_LAYERS_CPU_FALLBACK=1)" in caplog.text and "Optimization Done" in caplog.text


def test_gpu_flag_without_a_gpu(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^--gpu 0: no CUDA device is available to torch; set "
                                         "CAFFE_LAYERS_CPU_FALLBACK=1 to run on the CPU instead$"):
        main(["test", "--model=" + str(files / "net.prototxt"), "--weights=w", "--gpu=0", "--iterations=1"])


def test_device_query(monkeypatch):
    assert main(["device_query"]) == 0  # as caffe: no -gpu, nothing to query
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="device_query --gpu 0: no CUDA device is available to torch"):
        main(["device_query", "-gpu", "0"])


SUB_SED = "'s,${NUM_OUT},'\"${NUM_OUT}\"',g;s,${EXP},'\"${EXP}\"',g'"
DRIVER = r"""#!/bin/bash
NET_ID=tiny
ITERS=3
EXP=exp
NUM_OUT=1
CAFFE_BIN=${CAFFE_BIN_UNDER_TEST}
GPU_ID="0"
CONFIG_DIR=${EXP}/config/${NET_ID}
MODEL=${EXP}/model/${NET_ID}/init.caffemodel
for pname in test; do
    sed "$(eval echo $(cat sub.sed))" \
        ${CONFIG_DIR}/${pname}.prototxt > ${CONFIG_DIR}/${pname}_sub.prototxt
done
CMD="${CAFFE_BIN} test \
         --model=${CONFIG_DIR}/test_sub.prototxt \
         --weights=${MODEL} \
         --gpu=${GPU_ID} \
         --iterations=${ITERS}"
echo Running ${CMD} && ${CMD}
"""


def test_segaware_style_driver_script(tmp_path):
    """The shape of segaware's scripts/test_*.sh: a sed-substituted config, then ${CAFFE_BIN} test with
    --model=, --weights=, --gpu= and --iterations=; here CAFFE_BIN is our command."""
    import caffe_layers as caffe

    config = tmp_path / "exp" / "config" / "tiny"
    config.mkdir(parents=True)
    (tmp_path / "exp" / "model" / "tiny").mkdir(parents=True)
    (config / "test.prototxt").write_text(NET.replace("num_output: 1", "num_output: ${NUM_OUT}"))
    (tmp_path / "sub.sed").write_text(SUB_SED + "\n")
    (tmp_path / "driver.sh").write_text(DRIVER)
    (config / "ready.prototxt").write_text(NET)
    net = caffe.Net(str(config / "ready.prototxt"), caffe.TEST)
    net.params["fc"][0].data[...] = 0.5
    net.params["fc"][1].data[...] = 0.25
    net.save(str(tmp_path / "exp/model/tiny/init.caffemodel"))
    env = dict(os.environ, CAFFE_BIN_UNDER_TEST=f"{sys.executable} -m caffe_layers.tools.cli")
    if not torch.cuda.is_available():
        env["CAFFE_LAYERS_CPU_FALLBACK"] = "1"  # without it --gpu=0 is refused (test_gpu_flag_without_a_gpu)
    done = subprocess.run(["bash", "driver.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "num_output: 1" in (config / "test_sub.prototxt").read_text()
    # fc = 3 * 0.5 + 0.25 = 1.75 against y = 1 (the one filler fills both tops): 0.75^2 * 2 / (2 * 2)
    assert "Batch 2, loss = 0.28125" in done.stderr and "loss = 0.28125 (* 1 = 0.28125 loss)" in done.stderr
