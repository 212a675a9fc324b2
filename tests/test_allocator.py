"""captioner.allocator: freed memory is reused instead of page-faulted back in."""

import platform
import subprocess
import sys

import lightning as L
import pytest

from captioner import run

FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from captioner.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # like a training step: large blocks alive together, then all freed
    blocks = [torch.ones(n << 20) for n in (4, 8, 2, 16, 4)]  # 16..64 MiB each
    return sum(float(b[0]) for b in blocks)
for _ in range(6):  # warm-up: the heap settles (3 left a block to fault in 1 run in 4)
    step()
before = faults()
for _ in range(3):
    step()
print(faults() - before)
"""

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                             text=True, check=True, timeout=120)
        return int(out.stdout.split()[-1])

    default, keep = faults("default"), faults("keep")
    assert default > 3 * (16 << 20) // 4096  # default: steady-state steps fault memory back in
    assert keep < default / 10


def test_configure_allocator_auto_follows_the_trainer_device(monkeypatch):
    calls = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: calls.append(1) or True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    assert run.configure_allocator("auto", trainer) and len(calls) == 1
    assert not run.configure_allocator(False, trainer) and len(calls) == 1
    assert run.configure_allocator(True, trainer) and len(calls) == 2
    with pytest.raises(ValueError, match="keep_freed_memory must be auto, true or false"):
        run.configure_allocator("yes", trainer)
