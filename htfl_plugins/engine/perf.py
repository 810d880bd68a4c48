"""Process-level settings that make small-batch CPU training cheaper.

At the batch sizes of federated clients (10 by default) a training step
allocates and frees the same activation and gradient buffers every step. glibc
returns large freed blocks to the OS (``mmap``/``munmap``, heap trimming), so
a step can pay for page faults on fresh memory. :func:`tune_allocator` keeps
freed memory for reuse instead. In fresh processes (``benchmarks/step.py``) a
ResNet-18 step at batch 10 went from about 4,700 minor page faults to none and
from 42 to 36 ms on one thread (31 to 22 ms on two); over a whole round in a
long-lived process the gain was within noise, as glibc's own adaptive
thresholds catch up (benchmarks/RESULTS.md, section 5). It changes no number,
only where memory comes from; ``HTFL_MALLOC_TUNING=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap for reuse; True if it was applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("HTFL_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1  # glibc's maximum: 32 MiB
              and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
              and libc.mallopt(_M_TOP_PAD, 64 << 20) == 1)
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _done = ok
    return ok
