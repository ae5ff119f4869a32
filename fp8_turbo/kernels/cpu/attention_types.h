// Types of the paged-attention kernel (attention_kernel.h), shared by attention.cpp and step.cpp.
// Included once, outside the per-ISA namespaces.
#pragma once

#include <cstdint>

namespace fp8t {

enum KvType { KV_E4M3 = 0, KV_BF16 = 1, KV_F32 = 2 };

struct Attn {
  int64_t D = 0;
  float qk_scale = 1.0f;  // sm_scale * k_scale * log2(e), * 256 for e4m3 keys
  float v_scale = 1.0f;   // v_scale, * 256 for e4m3 values
};

}  // namespace fp8t
