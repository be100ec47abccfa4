"""cuda_emu: run csrc/cuda kernels on the CPU for tests (README.md)."""
