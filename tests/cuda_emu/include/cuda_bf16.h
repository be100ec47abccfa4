// cuda_emu: bfloat16 as c10::BFloat16 (round to nearest even from float, as __float2bfloat16).
#pragma once
#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;
inline __nv_bfloat16 __float2bfloat16(float x) { return c10::BFloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
