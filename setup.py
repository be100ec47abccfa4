"""Build of the optional native extension ``panther_fx._C`` (CPU kernels, plus CUDA when available).

PANTHER_BUILD_EXT=0 skips the extension (the pure-PyTorch ops then run everywhere). PANTHER_CUDA=auto|0|1
chooses the CUDA sources: auto builds them when torch is a CUDA build and a CUDA toolkit is found
(CUDA_HOME), whether or not a GPU is visible. A requested build that fails to compile fails the install:
a silent fallback would hide missing kernels (``panther-fx info`` reports what is active).
"""

import glob
import os

from setuptools import setup


def ext_modules():
    if os.environ.get("PANTHER_BUILD_EXT", "1") == "0":
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    want = os.environ.get("PANTHER_CUDA", "auto")
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) if want == "auto" else want == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    flags = {"cxx": ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x030B0000"]}
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        flags["cxx"].append("-DPANTHER_WITH_CUDA")
        flags["nvcc"] = ["-O3", "--use_fast_math", "-DPANTHER_WITH_CUDA", "-std=c++17"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extension = CUDAExtension
    else:
        extension = CppExtension
    print(f"panther_fx: building {extension.__name__} from {len(sources)} sources")
    return [extension("panther_fx._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"],
                      py_limited_api=True)]


def cmdclass():
    if os.environ.get("PANTHER_BUILD_EXT", "1") == "0":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=ext_modules(), cmdclass=cmdclass(), options={"bdist_wheel": {"py_limited_api": "cp311"}})
