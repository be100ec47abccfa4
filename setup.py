"""Build of the optional native extension ``panther_fx._C`` (CPU kernels, plus CUDA when available).

Build decision:
- ``pip install --no-build-isolation -e .`` builds ``panther_fx._C`` from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``
  (plus ``csrc/cuda/*.cu`` with CUDA). A requested build that fails to compile (no compiler, bad toolkit) fails
  the install: a silent fallback would hide missing kernels. ``panther-fx info`` reports what is active.
- ``PANTHER_BUILD_EXT=0`` skips the extension; the pure-PyTorch op bodies then run on every device (and
  ``PANTHER_NO_EXT=1`` at run time ignores a built extension).
- ``PANTHER_CUDA=0|1`` chooses the CUDA sources; by default they are built when torch is a CUDA build and a
  CUDA toolkit is found (CUDA_HOME), and skipped with a printed note otherwise (the ops then run their
  PyTorch bodies on CUDA: cuBLAS GEMMs in the op's dtype). ``PANTHER_CUDA=1`` makes a missing toolkit an
  error, ``PANTHER_CUDA=0`` builds the CPU kernels only. Without a visible GPU set TORCH_CUDA_ARCH_LIST
  (default here "8.0;9.0") and, if nvcc's parent directory lacks lib64/libcudart, CUDA_HOME to the toolkit
  root. The CUDA kernels were validated on an H100 (torch 2.11.0+cu130, nvcc 13.0): scripts/gpu_validate.sh.
- The extension is abi3 (``py_limited_api``: one build per torch version for every supported CPython), has no
  pybind module (a dummy ``PyInit__C``) and only registers ``TORCH_LIBRARY_IMPL(panther, CPU|CUDA|Autograd)``
  kernels for ops whose schemas live in ``panther_fx/ops``. It is built against one torch version; rebuild after
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
    if want not in ("0", "1", "auto"):
        raise ValueError(f"PANTHER_CUDA must be 0, 1 or unset, got {want!r}")
    cuda_found = torch.version.cuda is not None and CUDA_HOME is not None
    if want == "1" and not cuda_found:
        raise RuntimeError(f"PANTHER_CUDA=1 needs a CUDA build of torch (this is {torch.__version__}) and a CUDA "
                           f"toolkit (CUDA_HOME={CUDA_HOME})")
    use_cuda = want == "1" or (want == "auto" and cuda_found)
    if want == "auto" and torch.version.cuda is not None and CUDA_HOME is None:
        print("panther_fx: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME): building the CPU "
              "kernels only; the ops run their PyTorch bodies on CUDA")
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
    # The shared C++ runtime by file name, ahead of the driver's implicit -lstdc++: the H100 image's g++
    # (/opt/gcc) only finds a static libstdc++.a, which gave the extension a second, uninitialised copy of
    # iostreams next to torch's, and the first TORCH_CHECK message that formatted an integer segfaulted.
    link = ["-fopenmp", "-l:libstdc++.so.6"]
    return [extension("panther_fx._C", sources, extra_compile_args=flags, extra_link_args=link, py_limited_api=True)]


def cmdclass():
    if os.environ.get("PANTHER_BUILD_EXT", "1") == "0":
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=ext_modules(), cmdclass=cmdclass(), options={"bdist_wheel": {"py_limited_api": "cp311"}})
