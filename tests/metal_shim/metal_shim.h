// A stand-in for the parts of Metal (metal_stdlib) and of MLX's Metal utils (bfloat16_t,
// float16_t) that the centroid-head kernels use. It takes the place of the text MLX prepends
// (metal::utils()) so that clang can syntax-check the exact kernel source as C++ and g++ can run
// it (metal_emu.h). Keep it minimal: every name declared here must exist in Metal with this
// meaning, so that a kernel passing the check uses nothing Metal lacks.
#pragma once

// Address spaces. For the clang check (metal_emu.h defines METAL_EMU before this file), Metal's
// address spaces are distinct clang address spaces, so a pointer cannot silently move between
// them (a `constant` input handed on as `device`, a `threadgroup` array read through a `thread`
// pointer) and a write to an input is a write through a pointer to const: errors as in Metal.
// `thread`, the default address space of locals, is clang's default one. `threadgroup`
// variables are `static`: one copy per threadgroup (the emulator runs threadgroups one after
// another).
#ifdef METAL_EMU
#define device
#define constant
#define thread
#define threadgroup static
#else
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define thread
#define threadgroup static __attribute__((address_space(3)))
#endif

// The compiler's own spellings, so these agree with <cstdint> wherever both are seen.
typedef unsigned int uint;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __SIZE_TYPE__ size_t;

struct uint3 {
  uint x, y, z;
};

typedef _Float16 half;
typedef half float16_t;

#ifdef METAL_EMU
// bfloat16: the high half of a float32, rounded to nearest even (the emulator's buffers hold
// the raw bits).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
#else
// A real 16-bit floating-point type, as Metal's bfloat is (arithmetic, promotions and
// conversions follow the type system, not a class's operators).
typedef __bf16 bfloat16_t;
#endif

#define INFINITY (__builtin_inff())

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

void threadgroup_barrier(mem_flags flags);
float simd_sum(float x);
float simd_max(float x);
uint simd_min(uint x);

inline bool isnan(float x) {
  return x != x;
}

}  // namespace metal
