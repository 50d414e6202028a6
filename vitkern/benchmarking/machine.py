"""The device's roofline, measured once at the start of a run.

- memory bandwidth: a large tensor copy (``dst.copy_(src)``), counting the bytes the copy must
  move (read ``src`` + write ``dst``), best of several repeats. On CPU the write-allocate read
  of ``dst`` is real traffic the model does not count, so CPU bandwidth reads slightly low -
  the same convention as the byte model of :mod:`vitkern.roofline`.
- compute: a large square matmul, ``2*n^3`` FLOPs, best of several repeats; CPU in fp32 (its
  fastest general path), CUDA in the benchmark dtype (tensor cores for fp16/bf16; fp32 without
  TF32).

Best-of rather than median because a roofline is the attainable peak: slower repeats on a
shared machine measure the neighbours, not the device.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict

import torch


@dataclasses.dataclass
class MachineRoofline:
    device: str
    device_name: str
    bandwidth_gbs: float
    matmul_gflops: float
    matmul_dtype: str
    copy_bytes: int
    matmul_n: int
    threads: int
    method: str

    def bound_seconds(self, nbytes: int, flops: int) -> float:
        return max(nbytes / (self.bandwidth_gbs * 1e9), flops / (self.matmul_gflops * 1e9))

    def as_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def _best_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (page faults, library initialisation)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "cpu"


def measure_roofline(device: torch.device, dtype: torch.dtype = torch.float32,
                     quick: bool = False) -> MachineRoofline:
    """Measure bandwidth and matmul rate on ``device`` (a second or two on CPU)."""
    if device.type == "cuda":
        copy_elems, n, repeats = (64 << 20 if quick else 256 << 20), (4096 if quick else 8192), 10
        mm_dtype = dtype
        name = torch.cuda.get_device_name(device)
    else:
        copy_elems, n, repeats = (16 << 20 if quick else 64 << 20), (1024 if quick else 2048), 5
        mm_dtype = torch.float32
        name = cpu_name()
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    t_copy = _best_seconds(lambda: dst.copy_(src), repeats, device)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=device).to(mm_dtype)
    b = torch.randn(n, n, device=device).to(mm_dtype)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = _best_seconds(lambda: a @ b, repeats, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return MachineRoofline(
        device=device.type, device_name=name, bandwidth_gbs=copy_bytes / t_copy / 1e9,
        matmul_gflops=2 * n ** 3 / t_mm / 1e9, matmul_dtype=str(mm_dtype).replace("torch.", ""),
        copy_bytes=copy_bytes, matmul_n=n, threads=torch.get_num_threads(),
        method=(f"bandwidth: best of {repeats} copies of {copy_bytes // 2 >> 20} MiB (read+write counted); "
                f"compute: best of {repeats} {n}x{n} matmuls"))
