"""Build of the optional native extension ``panther_fx._C`` (CPU kernels, plus CUDA when available).

Build decision:
- ``pip install --no-build-isolation -e .`` builds ``panther_fx._C`` from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``
  (plus ``csrc/cuda/*.cu`` with CUDA). A requested build that fails to compile (no compiler, bad toolkit) fails
  the install: a silent fallback would hide missing kernels. ``panther-fx info`` reports what is active.
- ``PANTHER_BUILD_EXT=0`` skips the extension; the pure-PyTorch op bodies then run on every device (and
  ``PANTHER_NO_EXT=1`` at run time ignores a built extension).
- ``PANTHER_CUDA=auto|0|1`` chooses the CUDA sources: auto builds them when torch is a CUDA build and a CUDA
  toolkit is found (CUDA_HOME), whether or not a GPU is visible. Without a visible GPU set TORCH_CUDA_ARCH_LIST
  (default here "8.0;9.0") and, if nvcc's parent directory lacks lib64/libcudart, CUDA_HOME to the toolkit root.
- The extension is abi3 (``py_limited_api``: one build per torch version for every supported CPython), has no
  pybind module (a dummy ``PyInit__C``) and only registers ``TORCH_LIBRARY_IMPL(panther, CPU|CUDA)`` kernels
  for ops whose schemas live in ``panther_fx/ops``. It is built against one torch version; rebuild after
  upgrading torch.
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
    flags = {"cxx": ["-O3", "-fopenmp"]}  # BuildExtension adds -DPy_LIMITED_API (abi3)
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        flags["cxx"].append("-DPANTHER_WITH_CUDA")
        flags["nvcc"] = ["-O3", "-DPANTHER_WITH_CUDA"]
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
