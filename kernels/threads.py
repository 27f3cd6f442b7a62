"""Small torch ops on the calling thread, without waking OpenMP's workers.

torch runs an elementwise op or a reduction of more than 32768 elements in an OpenMP parallel
region. Where the workers wait passively (OMP_WAIT_POLICY=PASSIVE, what `tandem serve` sets) a
region starts by waking a sleeping thread, 0.1-0.2 ms in a micro-benchmark on this project's
virtual machines: as much as a decode step's logits ops cost on one thread (a batch-8 greedy
step ran 3 such regions, sampling at a temperature 11). `serial_ops(numel)` runs the torch
ops of its block on the calling thread when their operands are small: it lowers the OpenMP
team size of this thread only (torch.set_num_threads would also clear oneDNN's primitive
cache, every time).

Tandem's C kernels take their team size from torch.get_num_threads(), so a block under
serial_ops runs them on one thread too: keep the heavy kernels out of it.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

# Operands up to this many elements (4 MB of fp32): one thread reads them in about the time
# a wake-up and the other thread's half would take.
SERIAL_LIMIT = 1 << 20


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (opened by soname, so the same library), or None."""
    import torch  # noqa: F401  (loads libgomp first)

    try:
        library = ctypes.CDLL("libgomp.so.1")
        library.omp_get_max_threads.restype = ctypes.c_int
        library.omp_set_num_threads.argtypes = [ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return library


@contextmanager
def serial_ops(numel: int) -> Iterator[None]:
    """Within the block, torch's ops run on this thread if numel <= SERIAL_LIMIT."""
    library = _openmp() if numel <= SERIAL_LIMIT else None
    threads = library.omp_get_max_threads() if library is not None else 1
    if threads <= 1:
        yield
        return
    library.omp_set_num_threads(1)
    try:
        yield
    finally:
        library.omp_set_num_threads(threads)
