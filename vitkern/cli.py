"""The `vitkern` command line: `vitkern info`, `vitkern bench`, `vitkern profile`."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception:
        return "not installed"


def info_lines():
    import torch

    from . import _backend
    import vitkern

    dev = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only (no CUDA device)"
    ext = "loaded" if _backend.extension_loaded() else f"not loaded ({_backend.extension_error()})"
    return [
        ("vitkern", vitkern.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("timm", _version("timm")),
        ("device", dev),
        ("cpu threads", str(torch.get_num_threads())),
        ("vitkern._C", ext),
        ("cpu path", _backend.cpu_path_name()),
        ("triton interpreter", "on (TRITON_INTERPRET=1)" if _backend.interpreter_on() else "off"),
        ("auto backend", "triton" if torch.cuda.is_available() else "cpu"),
    ]


def cmd_info(args) -> int:
    for k, v in info_lines():
        print(f"{k:<20} {v}")
    return 0


def _delegate(module: str, argv) -> int:
    mod = importlib.import_module(module)
    return mod.main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vitkern", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, which CPU path and backend are active")
    sub.add_parser("bench", help="benchmark vitkern against its peers (see `vitkern bench -h`)",
                   add_help=False)
    sub.add_parser("profile", help="profile a model under torch.profiler (see `vitkern profile -h`)",
                   add_help=False)
    if argv and argv[0] in ("bench", "profile"):
        return _delegate(f"vitkern.{argv[0]}_cli", argv[1:])
    args = parser.parse_args(argv)
    return cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
