"""Build and install vitkern.

The C++ extension `vitkern._C` (CPU kernels, see csrc/) is built with torch's CppExtension at
-O3 with OpenMP. It must be built against the torch already installed, so install with
`pip install --no-build-isolation -e .` (build isolation would fetch a second torch).
Set VITKERN_BUILD_EXT=0 to skip it: vitkern then runs on its native PyTorch CPU path.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("VITKERN_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch absent: install the pure-Python package only
        print("vitkern: torch not importable at build time; skipping vitkern._C")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        name="vitkern._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp", "-std=c++20"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="vitkern",
    version="0.1.0",
    description="Fused Triton attention kernels for vision transformers (ViT, Swin, Performer)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vitkern", "vitkern.*"]),
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "timm>=1.0", "scikit-learn"],
        "bench": ["pytest-benchmark", "timm>=1.0", "matplotlib"],
    },
    entry_points={"console_scripts": ["vitkern=vitkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
