// The CPU linear kernels, written once over an ISA's step traits S and compiled once per ISA:
// each cpu/linear_<isa>.cpp includes this file inside its `#pragma GCC target` region and its own
// namespace (hence no include guard and no includes: common/linear_kernels.h comes first).
//
// S supplies, on top of Fp32Operands / Bf16Operands:
//   Acc                   16 fp32 partial sums (one output tile row)
//   kMaxRows              rows of x per register block (bounded by the vector registers)
//   zero(), add(a, b), store(acc, float[16])
//   step(acc, line, xval) acc += the 64-byte weight line times the broadcast activation value
//
// Loop order: tile outer, row blocks inner. The first row block streams the tile from memory
// (and prefetches); later blocks of a batch > kMaxRows re-read it from L2, where a 16-row tile of
// K <= 14336 fits. So memory sees each weight once per call whatever the batch.

template <class S, int M, bool kPrefetch>
inline void tile_rows(const Problem& p, const uint8_t* tile, const typename S::Elem* x, float* sums) {
  using Acc = typename S::Acc;
  // Two independent accumulator chains per row when registers allow, so a small batch is not
  // held to one FMA per FMA latency; a larger block already has M chains in flight.
  constexpr int kChains = 2 * M <= S::kMaxRows ? 2 : 1;
  Acc acc[kChains][M];
#pragma GCC unroll 16
  for (int c = 0; c < kChains; ++c) {
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[c][m] = S::zero();
  }
  const int64_t full_steps = p.k / S::kKPerStep;
  int64_t s = 0;
  for (; s + kChains <= full_steps; s += kChains) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) {
      const uint8_t* line = tile + (s + c) * kStepBytes;
      if constexpr (kPrefetch) __builtin_prefetch(line + kPrefetchBytes, 0, 3);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) S::step(acc[c][m], line, S::x_at(x + m * p.x_stride, s + c));
    }
  }
  for (; s < full_steps; ++s) {
    const uint8_t* line = tile + s * kStepBytes;
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) S::step(acc[0][m], line, S::x_at(x + m * p.x_stride, s));
  }
  if (full_steps < p.steps) {  // bf16 with odd K: the last line pairs x[K-1] with a zero pad
    const uint8_t* line = tile + full_steps * kStepBytes;
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) S::step(acc[0][m], line, S::x_partial(x + m * p.x_stride, full_steps));
  }
#pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    Acc total = acc[0][m];
    if constexpr (kChains == 2) total = S::add(total, acc[1][m]);
    S::store(total, sums + m * kTileRows);
  }
}

// sums[m * 16 + j] = (x[m] . W[n0 + j]) for m < rows (<= S::kMaxRows): picks the instantiation.
template <class S, bool kPrefetch, int... Ms>
inline void tile_block(const Problem& p, const uint8_t* tile, const typename S::Elem* x, int64_t rows, float* sums,
                       std::integer_sequence<int, Ms...>) {
  ((rows == Ms + 1 ? (tile_rows<S, Ms + 1, kPrefetch>(p, tile, x, sums), true) : false) || ...);
}

template <class S>
inline void tile_block(const Problem& p, const uint8_t* tile, int64_t row0, float* sums) {
  const auto* x = static_cast<const typename S::Elem*>(p.x) + row0 * p.x_stride;
  const int64_t rows = std::min<int64_t>(S::kMaxRows, p.rows - row0);
  const auto all_sizes = std::make_integer_sequence<int, S::kMaxRows>();
  if (row0 == 0) {
    tile_block<S, true>(p, tile, x, rows, sums, all_sizes);
  } else {
    tile_block<S, false>(p, tile, x, rows, sums, all_sizes);
  }
}

template <class S>
void linear_tiles(const Problem& p, int64_t begin, int64_t end) {
  using Elem = typename S::Elem;
  alignas(64) float sums[S::kMaxRows * kTileRows];
  auto* out = static_cast<Elem*>(p.out);
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* tile = p.tiles + t * p.steps * kStepBytes;
    const int64_t n0 = t * kTileRows;
    const int64_t width = std::min(kTileRows, p.n - n0);
    for (int64_t row0 = 0; row0 < p.rows; row0 += S::kMaxRows) {
      tile_block<S>(p, tile, row0, sums);
      const int64_t rows = std::min<int64_t>(S::kMaxRows, p.rows - row0);
      for (int64_t m = 0; m < rows; ++m) {
        Elem* dst = out + (row0 + m) * p.out_stride + n0;
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<Elem>(sums[m * kTileRows + j]);
      }
    }
  }
}

// Tile t is gate tile 2t and up tile 2t + 1. gate and up are rounded to the output dtype first,
// as F.linear would return them, so the fused op equals linear followed by silu_and_mul.
template <class S>
void silu_mul_tiles(const Problem& p, int64_t begin, int64_t end) {
  using Elem = typename S::Elem;
  alignas(64) float gate[S::kMaxRows * kTileRows];
  alignas(64) float up[S::kMaxRows * kTileRows];
  auto* out = static_cast<Elem*>(p.out);
  const int64_t tile_bytes = p.steps * kStepBytes;
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* gate_tile = p.tiles + 2 * t * tile_bytes;
    const int64_t f0 = t * kTileRows;
    const int64_t width = std::min(kTileRows, p.n - f0);
    for (int64_t row0 = 0; row0 < p.rows; row0 += S::kMaxRows) {
      tile_block<S>(p, gate_tile, row0, gate);
      tile_block<S>(p, gate_tile + tile_bytes, row0, up);
      const int64_t rows = std::min<int64_t>(S::kMaxRows, p.rows - row0);
      for (int64_t m = 0; m < rows; ++m) {
        Elem* dst = out + (row0 + m) * p.out_stride + f0;
        for (int64_t j = 0; j < width; ++j) {
          const float g = static_cast<float>(static_cast<Elem>(gate[m * kTileRows + j]));
          const float u = static_cast<float>(static_cast<Elem>(up[m * kTileRows + j]));
          dst[j] = static_cast<Elem>(g / (1.f + std::exp(-g)) * u);
        }
      }
    }
  }
}

// The kernels' load loop without the arithmetic of a batch: an FMA per line into four chains.
template <class S>
float read_lines(const uint8_t* data, int64_t lines) {
  using Acc = typename S::Acc;
  Acc acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
  int64_t i = 0;
  for (; i + 4 <= lines; i += 4) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const uint8_t* line = data + (i + c) * kStepBytes;
      __builtin_prefetch(line + kPrefetchBytes, 0, 3);
      S::step(acc[c], line, typename S::XVal{1});
    }
  }
  for (; i < lines; ++i) S::step(acc[0], data + i * kStepBytes, typename S::XVal{1});
  alignas(64) float sums[kTileRows];
  S::store(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])), sums);
  return sums[0];
}

template <class S>
constexpr KernelSet kernel_set(const char* isa) {
  return KernelSet{isa, &linear_tiles<S>, &silu_mul_tiles<S>, &read_lines<S>};
}
