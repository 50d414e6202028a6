"""Ahead-of-time compilation of vitkern's Triton kernels for real GPU targets, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin for any ``GPUTarget``; Triton ships
``ptxas`` and ``cuobjdump``, whose reports give registers, spills and shared memory. This is how
the project proves every kernel and autotune config builds for sm_80 (A100) and sm_90 (H100)
and does not spill.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields interpreter objects that cannot be compiled,
so :func:`compile_report` runs the compilation in a subprocess with the interpreter off.

A :class:`KernelSpec` names a kernel by module and attribute (autotuned kernels are unwrapped),
its Triton signature (``{"Q": "*fp16", "N": "i32", ...}``), the constexpr values, and the launch
options (``num_warps``, ``num_stages``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

ARCHS = (80, 90)


@dataclasses.dataclass
class KernelSpec:
    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""

    def key(self) -> str:
        return self.label or f"{self.kernel}[w{self.num_warps}s{self.num_stages}]"


@dataclasses.dataclass
class CompileReport:
    label: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    uses_mma: bool
    uses_wgmma: bool
    error: Optional[str] = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def line(self) -> str:
        if self.error:
            return f"{self.label:<48} sm_{self.arch}  FAILED: {self.error}"
        tc = "wgmma" if self.uses_wgmma else ("mma" if self.uses_mma else "-")
        return (f"{self.label:<48} sm_{self.arch}  regs={self.registers:<4} "
                f"spill={self.spill_stores}/{self.spill_loads}B  smem={self.shared_bytes:<6} "
                f"warps={self.num_warps} stages={self.num_stages} tc={tc}")


def _nvidia_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """Registers and spills as ptxas prints them with -v for the given PTX."""
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_nvidia_bin("ptxas"), "-v", f"-arch={sm}", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-400:]}")

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack_bytes": grab(r"(\d+) bytes stack frame")}


def _compile_one(spec: KernelSpec, arch: int) -> CompileReport:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    # Autotuner / Heuristics wrappers also carry arg_names; unwrap down to the jitted function.
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    base = dict(label=spec.key(), kernel=spec.kernel, arch=arch, num_warps=spec.num_warps,
                num_stages=spec.num_stages)
    try:
        src = ASTSource(fn, dict(spec.signature), dict(spec.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        ptx = compiled.asm["ptx"]
        usage = _ptxas_report(ptx, arch)
        return CompileReport(**base, **usage, shared_bytes=int(compiled.metadata.shared),
                             uses_mma=bool(re.search(r"\bmma\.sync", ptx)),
                             uses_wgmma="wgmma.mma_async" in ptx)
    except Exception as exc:  # report, don't crash the whole sweep
        return CompileReport(**base, registers=0, spill_stores=0, spill_loads=0, stack_bytes=0,
                             shared_bytes=0, uses_mma=False, uses_wgmma=False,
                             error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")


def _compile_in_process(specs: List[KernelSpec], archs) -> List[CompileReport]:
    return [_compile_one(s, a) for s in specs for a in archs]


def compile_report(specs: List[KernelSpec], archs=ARCHS) -> List[CompileReport]:
    """Compile every spec for every arch; returns one report per (spec, arch)."""
    from ._backend import interpreter_on
    if not interpreter_on():
        return _compile_in_process(specs, archs)
    payload = json.dumps({"specs": [dataclasses.asdict(s) for s in specs], "archs": list(archs)})
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "vitkern.aot"], input=payload, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-2000:]}")
    return [CompileReport(**r) for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _main() -> None:
    payload = json.loads(sys.stdin.read())
    specs = [KernelSpec(**s) for s in payload["specs"]]
    reports = _compile_in_process(specs, payload["archs"])
    print(json.dumps([dataclasses.asdict(r) for r in reports]))


if __name__ == "__main__":
    _main()
