"""Peak memory of one call.

- CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated`` minus what was
  allocated before the call.
- CPU: one call under ``torch.profiler.profile(profile_memory=True)``. The profiler records every
  allocation and free of PyTorch's CPU allocator (including tensors allocated inside C++
  kernels); summing them in time order gives the live bytes after each event, and the peak is
  the maximum. Like on CUDA it is the memory *above* what existed before the call: inputs and
  weights are excluded, the output and every temporary are included. Memory that libraries
  allocate outside PyTorch's allocator (oneDNN/MKL scratch, OpenMP stacks) is not seen.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Tuple

import torch

CPU_METHOD = "torch.profiler(profile_memory=True): max running sum of allocator events during one call"
CUDA_METHOD = "torch.cuda.max_memory_allocated during one call, minus memory allocated before it"


@contextlib.contextmanager
def quiet_native_stderr():
    """The profiler's native code logs start/stop lines on fd 2; hide them around start/stop."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_native_stderr():
        prof.start()
    try:
        out = fn()
        del out
    finally:
        with quiet_native_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[int], str]:
    """Peak bytes allocated during one call of ``fn`` above the level before it, and the method."""
    if device.type == "cuda":
        return _cuda_peak(fn, device), CUDA_METHOD
    return _cpu_peak(fn), CPU_METHOD
