"""train.cpu_heap: whether freed tensor memory stays in the process between steps."""

import os
import platform
import subprocess
import sys

import pytest

from tunelab.runtime.hardware import configure_cpu_heap

glibc_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)

# Five "training steps": each allocates and fills activations of several sizes, keeps them through the
# forward pass and frees them all in the backward. Counted: the page faults after a first step, i.e. pages
# the kernel had to hand out (zero-filled) again because the previous step's were given back.
FAULTS = """
import resource, sys, torch
from tunelab.runtime.hardware import configure_cpu_heap
print(configure_cpu_heap(sys.argv[1]), file=sys.stderr)
def step():
    acts = [torch.empty(mib * 2**18).fill_(1.0) for mib in (4, 48, 12, 48, 12, 96, 48, 12)]
    del acts
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
before = faults()
for _ in range(5):
    step()
print(faults() - before)
"""


def _refill_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


@glibc_linux
def test_keep_reuses_freed_memory_instead_of_faulting_it_in_again():
    released, kept = _refill_faults("release"), _refill_faults("keep")
    print(f"page faults over five steps: release {released:,}, keep {kept:,}")  # shown with pytest -s
    assert released > 5 * 65_536  # 5 steps, each faulting in again at least a quarter of its 280 MiB
    assert kept * 4 < released  # measured: about 10x fewer (glibc's memalign still grows the heap a little)


def test_release_and_user_malloc_settings_leave_glibc_alone(monkeypatch):
    assert configure_cpu_heap("release") == "release"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert configure_cpu_heap("keep") == "environment"
