// bf16 linear layers for large batches on AMX. The packed bf16 tile (common/linear_pack.h) holds,
// per 64-byte line, 16 outputs x one (even, odd) K pair: 16 consecutive lines are exactly an AMX
// B tile in its VNNI layout (16 pair-rows x 16 columns), so TDPBF16PS reads the weights as they
// are packed for the small-batch kernels; A tiles are 16 rows x 32 K of x, read in place.
//
// Blocking: 2 x 2 C tiles (32 rows of x against 2 sets of 16 outputs: two neighbouring tiles for
// linear, the gate and up halves of one tile for silu_mul), the classic register tiling that
// loads 2 A and 2 B tiles per 4 TDPBF16PS. The 32 rows' sums go through the same epilogues as
// the vector kernels.
#include "common/linear_kernels.h"

#if MG_LINEAR_X86_KERNELS
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace mistral_grpc::linear {
namespace {

// Linux: a process must ask before it uses the tile data registers (their state is 8 KiB).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// tmm0..3: C (rows 0-15 | 16-31) x (outputs set 0 | 1); tmm4, 5: A (rows 0-15, 16-31);
// tmm6, 7: B (outputs set 0, 1). All 16 rows of 64 bytes.
constexpr TileConfig full_tiles() {
  TileConfig config{};
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  return config;
}

bool request_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
  return amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

// Where both kernels find their operands, with the tile registers configured for this thread.
template <int kUnits>
struct AmxOperands {
  static constexpr int64_t kBStride = kUnits * kStepBytes;  // a sub-tile's consecutive lines
  static constexpr int64_t kBBlock = kTileRows * kBStride;   // 16 lines = 32 K

  explicit AmxOperands(const Problem& p)
      : x(static_cast<const uint8_t*>(p.x)),
        tile_bytes(p.steps * kUnits * kStepBytes),
        a_stride(p.x_stride * static_cast<int64_t>(sizeof(c10::BFloat16))),
        k_blocks(p.k / kAmxKBlock) {
    static constexpr TileConfig kConfig = full_tiles();
    _tile_loadconfig(&kConfig);
  }
  ~AmxOperands() { _tile_release(); }

  const uint8_t* x;
  int64_t tile_bytes, a_stride, k_blocks;
};

// Both kernels accumulate C in tmm0..3.
MG_ALWAYS_INLINE void zero_accumulator_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Hands a kernel's sums ([output set][row][16]) to the epilogue of its op.
template <int kUnits>
MG_ALWAYS_INLINE void store_sums(const Problem& p, const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                 const float* sums) {
  if constexpr (kUnits == 2) {
    store_silu_mul<c10::BFloat16>(p, ids, tiles, row0, rows, sums);
  } else {
    store_linear<c10::BFloat16>(p, ids, tiles, row0, rows, sums);
  }
}

// Items are pairs of tiles (linear) or single gate_up tiles; either way 32 outputs' worth of B.
template <int kUnits>
void amx_tiles(const Problem& p, int64_t begin, int64_t end) {
  using O = AmxOperands<kUnits>;
  const O o(p);
  alignas(64) float sums[2 * kAmxRowBlock * kTileRows];
  constexpr int64_t kTilesPerItem = kUnits == 1 ? 2 : 1;
  for (int64_t t = begin; t < end; t += kTilesPerItem) {
    const int tiles = static_cast<int>(std::min(kTilesPerItem, end - t));
    const uint8_t* b0 = p.tiles + t * o.tile_bytes;
    // The second output set: up rows (silu_mul), the next tile, or a repeat whose sums are dropped.
    const uint8_t* b1 = kUnits == 2 ? b0 + kStepBytes : (tiles == 2 ? b0 + o.tile_bytes : b0);
    const int64_t ids[2] = {t, t + 1};
    for (int64_t row0 = 0; row0 < p.rows; row0 += kAmxRowBlock) {
      const uint8_t* a = o.x + row0 * o.a_stride;
      zero_accumulator_tiles();
      for (int64_t kb = 0; kb < o.k_blocks; ++kb) {
        _tile_loadd(4, a + kb * 64, o.a_stride);
        _tile_loadd(5, a + 16 * o.a_stride + kb * 64, o.a_stride);
        _tile_loadd(6, b0 + kb * O::kBBlock, O::kBStride);
        _tile_loadd(7, b1 + kb * O::kBBlock, O::kBStride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      // The epilogues' layout: [output set][row][16], `rows` rows per set.
      const int64_t rows = std::min(kAmxRowBlock, p.rows - row0);
      _tile_stored(0, sums, 64);
      _tile_stored(2, sums + 16 * kTileRows, 64);
      _tile_stored(1, sums + rows * kTileRows, 64);
      if (rows > 16) _tile_stored(3, sums + (rows + 16) * kTileRows, 64);
      store_sums<kUnits>(p, ids, tiles, row0, rows, sums);  // a gate_up item is one tile
    }
  }
}

// Batches of at most 16 rows (decode steps): one A tile against four output sets (four tiles for
// linear; gate and up of two tiles for silu_mul). The 2 x 2 blocking above would spend half its
// TDPBF16PS on the zero rows of a 32-row block and stream one item at a time; here every product
// is useful and four B streams are in flight (bf16 [2 x 3584, 1024], 16 rows, cold weights:
// 0.93 -> 0.63 ms). No software prefetch: its instructions compete with the tile rows for the
// load ports (0.72 ms with it), and the hardware prefetchers follow the four sequential streams.
// tmm0..3: C, tmm4: A, tmm5..7: B, tmm5 reused for the fourth set once its product is issued.
template <int kUnits>
void amx_tiles_16(const Problem& p, int64_t begin, int64_t end) {
  using O = AmxOperands<kUnits>;
  const O o(p);
  alignas(64) float sums[4 * kTileRows * kTileRows];
  constexpr int64_t kTilesPerItem = kUnits == 1 ? 4 : 2;
  for (int64_t t = begin; t < end; t += kTilesPerItem) {
    const int tiles = static_cast<int>(std::min(kTilesPerItem, end - t));
    // Output set i: tile t + i (linear) or sub-tile i % 2 of tile t + i / 2 (silu_mul); sets past
    // the range repeat tile t and their sums are dropped.
    const uint8_t* b[4];
    for (int i = 0; i < 4; ++i) {
      const int tile = kUnits == 1 ? i : i / 2;
      b[i] = p.tiles + (t + (tile < tiles ? tile : 0)) * o.tile_bytes + (kUnits == 2 ? (i % 2) * kStepBytes : 0);
    }
    zero_accumulator_tiles();
    for (int64_t kb = 0; kb < o.k_blocks; ++kb) {
      const int64_t offset = kb * O::kBBlock;
      _tile_loadd(4, o.x + kb * 64, o.a_stride);
      _tile_loadd(5, b[0] + offset, O::kBStride);
      _tile_loadd(6, b[1] + offset, O::kBStride);
      _tile_loadd(7, b[2] + offset, O::kBStride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b[3] + offset, O::kBStride);
      _tile_dpbf16ps(3, 4, 5);
    }
    // The epilogues' layout: [output set][row][16], `rows` rows per set; each store's rows past
    // `rows` land where the next store (or the buffer's spare end) overwrites them.
    const int64_t rows = p.rows;
    _tile_stored(0, sums, 64);
    _tile_stored(1, sums + rows * kTileRows, 64);
    _tile_stored(2, sums + 2 * rows * kTileRows, 64);
    _tile_stored(3, sums + 3 * rows * kTileRows, 64);
    const int64_t ids[4] = {t, t + 1, t + 2, t + 3};
    store_sums<kUnits>(p, ids, tiles, 0, rows, sums);
  }
}

#pragma GCC pop_options

}  // namespace

bool amx_usable() {
  static const bool usable = request_amx();
  return usable;
}

const KernelSet kAmxBf16{&amx_tiles<1>, &amx_tiles<2>, nullptr};
const KernelSet kAmxBf16Rows16{&amx_tiles_16<1>, &amx_tiles_16<2>, nullptr};

}  // namespace mistral_grpc::linear

#endif  // MG_LINEAR_X86_KERNELS
