// The AMX tile configuration the AMX kernels load (cpu/linear_amx.cpp, cpu/attention_amx.cpp):
// palette 1, all eight tiles 16 rows of 64 bytes.
#pragma once

#include <cstdint>

namespace mistral_grpc::cpu {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

constexpr TileConfig full_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  return config;
}

}  // namespace mistral_grpc::cpu
