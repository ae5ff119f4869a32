// Argument structs of the fused small-op kernels (ops_kernel.h), shared by ops.cpp and step.cpp.
// Included once, outside the per-ISA namespaces.
#pragma once

#include <cstdint>

namespace fp8t {

struct Norm {
  const void* x = nullptr;         // [M, ldx]
  const void* residual = nullptr;  // [M, ldr] or null
  const void* weight = nullptr;    // [N]
  void* out = nullptr;             // [M, ldo]
  void* h_out = nullptr;           // [M, ldh]: x + residual, when there is a residual
  int64_t ldx = 0, ldr = 0, ldo = 0, ldh = 0, N = 0;
  float eps = 0.0f;
};

struct Rotary {
  void* x = nullptr;  // [T, heads, D] with strides ldt, ldh, 1
  const void* cos = nullptr;
  const void* sin = nullptr;  // [T, D] with stride ldc
  int64_t ldt = 0, ldh = 0, ldc = 0, heads = 0, D = 0;
};

struct SiluMul {
  const void* x = nullptr;  // [M, ldx]: gate [I] then up [I]
  void* out = nullptr;      // [M, ldo]
  int64_t ldx = 0, ldo = 0, I = 0;
};

}  // namespace fp8t
