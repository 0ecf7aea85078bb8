"""Keep freed memory for reuse instead of handing it back to the OS (glibc only).

A training step allocates and frees the same large buffers every time (the (N, V) logits
and probabilities of a 10k-word softmax are 14-28 MB each). glibc serves blocks that large
with mmap and returns them to the kernel on free, so every step pays page faults and the
kernel's zero-fill of fresh pages again -- measured at about a fifth of a PTB step on CPU.
Raising glibc's mmap and trim thresholds keeps those blocks in the heap, where the next step
reuses them. Peak memory is unchanged; memory is just not returned between steps.

Set RNNLM_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator() -> bool:
    """Apply the thresholds once per process; True when they were applied."""
    global _done
    if _done:
        return True
    if os.environ.get("RNNLM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    _done = ok
    return ok
