"""Builds forkdec: the Python package plus the torch extension forkdec._C.

CPU kernels are always built. CUDA kernels are added only when a CUDA toolkit
and a CUDA build of torch are both present (FORKDEC_CUDA=0 turns them off).
torch must already be installed: use `pip install --no-build-isolation .` so
the build sees it instead of fetching another torch into an isolated env.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("forkdec: install torch first (CPU machines: pip install torch==2.13.0), "
             "then pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cpu = ["csrc/registration.cpp"] + sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    want_cuda = os.environ.get("FORKDEC_CUDA", "1") != "0"
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is not None:
        nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension(
            "forkdec._C", cpu + sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    return CppExtension("forkdec._C", cpu, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="forkdec",
    version="0.1.0",
    description="Kernels and a minimal engine for decoding many reasoning paths of one prompt in one batch",
    python_requires=">=3.10",
    # every package under python/ (so a new subpackage cannot be left out of a wheel), plus the two top-level folders
    packages=find_packages("python") + ["forkdec.triton_kernels", "forkdec.bench"],
    package_dir={"forkdec": "python/forkdec", "forkdec.triton_kernels": "triton_kernels",
                 "forkdec.bench": "bench"},
    # A range that an installed torch satisfies installs nothing more: a CUDA torch stays.
    install_requires=["torch>=2.4", "numpy", "gguf>=0.10", "tokenizers>=0.19", "jinja2", "safetensors"],
    extras_require={
        "test": ["pytest", "triton", "matplotlib", "transformers>=5", "accelerate",
                 "fastapi", "uvicorn", "prometheus_client", "openai", "httpx", "hypothesis"],
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["forkdec=forkdec.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
