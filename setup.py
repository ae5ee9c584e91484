"""Builds mini_unlearn._C: the CPU kernels always; the CUDA kernels too where torch has CUDA
and nvcc is found, or with FORCE_CUDA=1 (FORCE_ONLY_CPU=1 skips them)."""
import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _use_cuda() -> bool:
    if os.environ.get("FORCE_ONLY_CPU") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: no FP traps are ever enabled, and it lets gcc vectorise floorf (the
    # stochastic rounding); values are unchanged (-ffp-contract=off keeps mul/add unfused).
    # -fopenmp: at::parallel_for is header-inline (ATen's OpenMP backend); without it the
    # kernels would silently run on one thread. The OpenMP runtime is torch's own libgomp.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    link = ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx += ["-mavx2", "-mfma", "-mf16c"]  # baseline; AVX-512 clones are chosen at run time
        # the AVX-512 clones use full 512-bit vectors (gcc's x86-64-v4 default is 256)
        cxx += ["-mprefer-vector-width=512"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if not _use_cuda():
        return CppExtension("mini_unlearn._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link, include_dirs=include_dirs, py_limited_api=True)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # cuBLAS/cuSPARSE headers of the pip CUDA wheels (torch's CUDA build) live here.
    import site

    for sp in site.getsitepackages():
        inc = os.path.join(sp, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            include_dirs.append(inc)
    nvcc = ["-O3", "--fmad=false"]
    return CUDAExtension("mini_unlearn._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
                         py_limited_api=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
