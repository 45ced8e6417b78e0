"""caffe_layers keeps freed memory in glibc's heap (caffe_layers/__init__.py, _keep_freed_memory)."""
import os
import subprocess
import sys

# page faults of forwards 3 to 12 of a net whose intermediate blobs (48 MiB each: above glibc's largest dynamic
# mmap threshold, 32 MiB) each forward frees
_LATER_FORWARDS = '''
import resource, torch, caffe_layers
net = caffe_layers.TorchNet("""name: "big" layer { name: "in" type: "Input" top: "x"
  input_param { shape { dim: 1 dim: 48 dim: 512 dim: 512 } } }
layer { name: "p" type: "Power" bottom: "x" top: "y" power_param { scale: 2 } }
layer { name: "q" type: "Power" bottom: "y" top: "z" power_param { shift: 1 } }
layer { name: "s" type: "Convolution" bottom: "z" top: "s" convolution_param { num_output: 1 kernel_size: 1 } }""")
x = torch.randn(1, 48, 512, 512)
with torch.inference_mode():
    net(x=x)
    net(x=x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x=x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "CAFFE_LAYERS_KEEP_FREED_MEMORY")}
    done = subprocess.run([sys.executable, "-c", _LATER_FORWARDS], capture_output=True, text=True,
                          env={**clean, **env})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_freed_blobs_are_reused_without_new_pages():
    blob_pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _faults(CAFFE_LAYERS_KEEP_FREED_MEMORY="0")  # glibc's own: two fresh blobs a forward
    assert default > 10 * blob_pages
    if os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        # (the heap's layout now and then takes a fresh block: a blob or two in ten forwards)
        assert _faults() < default / 4
    assert _faults(MALLOC_TRIM_THRESHOLD_="131072") > default / 2  # the user's own setting wins


def test_bad_setting_named():
    done = subprocess.run([sys.executable, "-c", "import caffe_layers"], capture_output=True, text=True,
                          env={**os.environ, "CAFFE_LAYERS_KEEP_FREED_MEMORY": "yes"})
    assert done.returncode != 0
    assert "CAFFE_LAYERS_KEEP_FREED_MEMORY='yes': expected 1 (default) or 0" in done.stderr.strip().splitlines()[-1]
