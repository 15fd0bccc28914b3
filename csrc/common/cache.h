// Paged KV cache addressing shared by the CPU and CUDA kernels. A cache is
// [num_blocks, block_size, num_kv_heads, head_dim]; slot = block * block_size + offset.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

// Elements from one cache row (token) of one head to the same head of the next token.
MG_HOST_DEVICE int64_t cache_token_stride(int64_t num_kv_heads, int64_t head_dim) { return num_kv_heads * head_dim; }

// Offset, in elements, of (slot, kv_head) in a cache laid out as above.
MG_HOST_DEVICE int64_t cache_offset(int64_t slot, int64_t kv_head, int64_t num_kv_heads, int64_t head_dim) {
  return slot * cache_token_stride(num_kv_heads, head_dim) + kv_head * head_dim;
}

// The slot holding position `pos` of a sequence whose blocks are `block_table`.
MG_HOST_DEVICE int64_t slot_of_position(const int32_t* block_table, int64_t pos, int64_t block_size) {
  return static_cast<int64_t>(block_table[pos / block_size]) * block_size + pos % block_size;
}

}  // namespace mistral_grpc
