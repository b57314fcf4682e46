"""fedgen.memory: a block PyTorch frees stays in the process, so the next step does not fault its
pages in again."""

import resource
import subprocess
import sys

from fedgen.memory import MMAP_THRESHOLD

BLOCK = 24 * 2**20  # below glibc's largest mmap threshold, far above its 128 KiB default
# In a fresh interpreter: malloc and fill a block twice, freeing it in between; print the page
# faults the second fill took, against the block's pages.
SECOND_FILL = f"""
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def fill():
    block = libc.malloc({BLOCK})
    ctypes.memset(block, 1, {BLOCK})
    libc.free(ctypes.c_void_p(block))
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = BLOCK // resource.getpagesize()


def second_fill_faults(*, import_fedgen: bool) -> int:
    code = ("import fedgen\n" if import_fedgen else "") + SECOND_FILL
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    assert BLOCK < MMAP_THRESHOLD
    assert second_fill_faults(import_fedgen=False) > PAGES / 2  # glibc's defaults: mapped afresh
    assert second_fill_faults(import_fedgen=True) < PAGES / 20
