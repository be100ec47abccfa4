// cuda_emu: launch and API errors are thrown by the emulator itself.
#pragma once
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
