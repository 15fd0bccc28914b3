// The AMX tile configurations the AMX kernels load (cpu/linear_amx.cpp, cpu/attention_amx.cpp):
// palette 1, tiles of 64-byte rows, all eight 16 rows high or the first few shorter.
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

// Tiles 0 .. count - 1 `rows` rows high (1 to 16), the others 16: a batch of fewer than 16 rows
// loads, multiplies and stores only its own rows. TDPBF16PS computes each row of C the same way
// whatever the tile's height, so a row's result does not change.
constexpr TileConfig short_tiles(int count, int rows) {
  TileConfig config = full_tiles();
  for (int t = 0; t < count; ++t) config.rows[t] = static_cast<uint8_t>(rows);
  return config;
}

}  // namespace mistral_grpc::cpu
