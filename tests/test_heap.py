"""wds_encode/job/heap.py: after `keep_freed_memory`, a large block allocated again after free is served
from memory the process already has (no page faults), as the CPU encoder allocates every layer's
output batch after batch, and `give_back_freed_memory` returns the free pages when asked. Each case
runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from wds_encode.job.heap import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(4, 1 << 22)             # 64 MB, above glibc's largest mmap threshold
faults = []
with torch.inference_mode():
    for _ in range(12):                # a "batch": two layers' outputs alive at once, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2
        z = torch.sin(y)
        del y, z
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting exists in glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 2 * (64 << 20) // 4096     # faulting in both outputs of one batch
    default = _faults("default")
    assert default["took"] is None
    assert min(default["faults"]) > pages // 2             # glibc maps and unmaps 64 MB blocks every time
    kept = _faults("keep")
    assert kept["took"] is True
    assert kept["faults"][0] > pages // 2                  # the first batches grow the heap
    assert statistics.median(kept["faults"][-5:]) < pages // 20   # then its memory is reused


TRIM_PROBE = r"""
import json, re
import torch
from wds_encode.job.heap import give_back_freed_memory, keep_freed_memory

def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

keep_freed_memory()
before = rss_mb()
blocks = [torch.ones(64 << 20, dtype=torch.uint8) for _ in range(4)]   # 256 MB, faulted in
del blocks
kept = rss_mb()
took = give_back_freed_memory()
print(json.dumps({"before": before, "kept": kept, "after": rss_mb(), "took": took}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting exists in glibc only")
def test_a_kept_heap_gives_its_free_pages_back_when_asked():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["took"] is True
    assert found["kept"] > found["before"] + 200          # freed, but kept by the process
    assert found["after"] < found["before"] + 50           # given back
