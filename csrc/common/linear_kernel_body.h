// The CPU linear kernels, written once over an ISA's step traits S and compiled once per ISA:
// each cpu/linear_<isa>.cpp includes this file inside its `#pragma GCC target` region and its own
// namespace (hence no include guard and no includes: common/linear_kernels.h comes first).
//
// S supplies, on top of Fp32Operands / Bf16Operands:
//   Acc                   16 fp32 partial sums (one row of x against 16 weight rows)
//   kStreams              tile sub-ranges read side by side (see below)
//   kAccumulators         Accs the registers hold at once, which bounds the rows per block
//   zero(), add(a, b), store(acc, float[16])
//   step(acc, line, xval) acc += the 64-byte weight line times the broadcast activation value
//
// A tile is kUnits 16-row sub-tiles interleaved line by line (1 for linear; 2, gate and up, for
// silu_mul), so it is one contiguous run of memory. A thread splits its tiles into kStreams
// contiguous sub-ranges and walks them side by side, tile i of each at once: one core keeps more
// DRAM requests in flight over several long streams than over one (measured here: one core reads
// ~14 GB/s from one stream, ~17 GB/s from four), and the streams' accumulators are independent
// FMA chains. Loop order: tiles outer, row blocks inner; the first block reads the tiles from
// memory, further blocks of a large batch re-read them from cache, so DRAM sees each weight once
// per call whatever the batch.
//
// Past the rows the accumulators hold, a batch is compute-bound and runs in row blocks. Each block
// re-reads the group from L2 and prefetches a share of the next group into L2 (BlockPlan), so
// memory keeps streaming while the blocks compute. Batches also trade streams for taller blocks
// (for_tiles): fewer blocks, less L2 traffic per FMA. Both together, fp32, 16 rows, weights cold
// (both cores here): gate_up [2 x 3584, 1024] 1.75 -> 1.36 ms, lm_head [32000, 1024] 6.9 -> 5.2 ms.

template <class S, int kUnits, int G>
constexpr int max_rows() {
  static_assert(S::kAccumulators >= G * kUnits);
  return S::kAccumulators / (G * kUnits);
}

// Which of a tile group's row blocks is running, of how many. With more than one, every block also
// prefetches its share of the next group (the next tile of every stream) into L2, so memory keeps
// streaming while the blocks compute and the next group's first block finds its tiles there.
struct BlockPlan {
  int64_t block;
  int64_t blocks;  // 1: no prefetch of the next group
};

// sums[((g * kUnits + u) * M + m) * 16 + j] = x[m] . W[row j of sub-tile u of the tile of stream g],
// for G tiles stream_stride bytes apart from `first`.
template <class S, int kUnits, int M, int G>
inline void group_rows(const Problem& p, const uint8_t* first, int64_t stream_stride, const typename S::Elem* x,
                       float* sums, BlockPlan plan) {
  constexpr int64_t kLineBytes = kUnits * kStepBytes;  // one step of every sub-tile
  // Small batches split K over two accumulator sets (even and odd steps) while registers allow,
  // for more independent chains: vdpbf16ps waits on its long latency with G * kUnits * M alone
  // (one core, one row, bf16 weights in L2: 71 GB/s with 4 chains, 83 GB/s with 8).
  constexpr int kSets = 2 * G * kUnits * M <= S::kAccumulators ? 2 : 1;
  // The same lines in flight however many streams: one stream prefetches S::kStreams times as far.
  // A gate_up stream, which reads its lines in (gate, up) pairs, half as far: at the full distance
  // gate_up lost 2-3% (fp32, batch 1) while the linear weights gained.
  constexpr int64_t kAheadBytes = kPrefetchBytes / kUnits * ((S::kStreams + G - 1) / G);
  typename S::Acc acc[kSets][G][kUnits][M];
#pragma GCC unroll 32
  for (int c = 0; c < kSets; ++c) {
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
      for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
        for (int m = 0; m < M; ++m) acc[c][g][u][m] = S::zero();
      }
    }
  }
  const int64_t tile_bytes = p.steps * kLineBytes;
  // The next group's line to prefetch advances kUnits / blocks lines a step (at most one): a running
  // remainder says when, a division per step would cost more than the step's FMAs at large batches.
  int64_t ahead_line = plan.block * p.steps * kUnits / plan.blocks;
  int64_t ahead_rem = plan.block * p.steps * kUnits % plan.blocks;
  // acc[c] += the step's lines of every stream, times x[:, step] (or the odd-K tail pair).
  const auto accumulate = [&](int c, int64_t step, bool partial) __attribute__((always_inline)) {
    bool ahead = false;
    if (plan.blocks > 1) {
      ahead_rem += kUnits;
      ahead = ahead_rem >= plan.blocks;
      if (ahead) {
        ahead_rem -= plan.blocks;
        ++ahead_line;
      }
    }
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      const uint8_t* lines = first + g * stream_stride + step * kLineBytes;
      if (ahead) __builtin_prefetch(first + g * stream_stride + tile_bytes + ahead_line * kStepBytes, 0, 2);
#pragma GCC unroll 32
      for (int u = 0; u < kUnits; ++u) {
        if (!partial) __builtin_prefetch(lines + u * kStepBytes + kAheadBytes, 0, 3);
#pragma GCC unroll 32
        for (int m = 0; m < M; ++m) {
          const typename S::Elem* row = x + m * p.x_stride;
          S::step(acc[c][g][u][m], lines + u * kStepBytes, partial ? S::x_partial(row, step) : S::x_at(row, step));
        }
      }
    }
  };
  const int64_t full_steps = p.k / S::kKPerStep;
  int64_t s = 0;
  for (; s + kSets <= full_steps; s += kSets) {
#pragma GCC unroll 2
    for (int c = 0; c < kSets; ++c) accumulate(c, s + c, false);
  }
  if (s < full_steps) accumulate(0, s, false);
  if (full_steps < p.steps) accumulate(0, full_steps, true);  // bf16, odd K: (x[K-1], 0) x zero pad
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
    for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
      for (int m = 0; m < M; ++m) {
        typename S::Acc total = acc[0][g][u][m];
        if constexpr (kSets == 2) total = S::add(total, acc[1][g][u][m]);
        S::store(total, sums + ((g * kUnits + u) * M + m) * kTileRows);
      }
    }
  }
}

// Rows [row0, row0 + rows) of x against G tiles: picks the instantiation for `rows`.
template <class S, int kUnits, int G, int... Ms>
inline void group_block(const Problem& p, const uint8_t* first, int64_t stream_stride, int64_t row0, int64_t rows,
                        float* sums, BlockPlan plan, std::integer_sequence<int, Ms...>) {
  const auto* x = static_cast<const typename S::Elem*>(p.x) + row0 * p.x_stride;
  ((rows == Ms + 1 ? (group_rows<S, kUnits, Ms + 1, G>(p, first, stream_stride, x, sums, plan), true) : false) ||
   ...);
}

// The most bytes of tiles a large batch re-reads block after block (half the L2 of a core here).
constexpr int64_t kReusedBytes = 1 << 20;

// Runs tiles [begin, end) as G side-by-side sub-ranges (and the few left over one by one), handing
// each set of tiles and row block to epilogue(tile_ids, tiles, row0, rows, sums). The rows go in
// blocks of equal size (16 rows of at most 14: 8 + 8, not 14 + 2) to keep each block's chains long.
template <class S, int kUnits, int G, class Epilogue>
inline void for_tile_streams(const Problem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  constexpr int R = max_rows<S, kUnits, G>();
  alignas(64) float sums[G * kUnits * R * kTileRows];
  const auto row_counts = std::make_integer_sequence<int, R>();
  const int64_t tile_bytes = p.steps * kUnits * kStepBytes;
  const int64_t blocks = (p.rows + R - 1) / R;
  const int64_t block_rows = (p.rows + blocks - 1) / blocks;
  // The next group beside the current one must fit the L2 budget too (not so: fp32 down_proj, K 3584).
  const int64_t ahead_blocks = 2 * G * tile_bytes <= kReusedBytes ? blocks : 1;
  // Row blocks after the first re-read the G tiles: if those would not fit in L2 (long K), one
  // tile at a time.
  const bool side_by_side = G > 1 && (p.rows <= R || G * tile_bytes <= kReusedBytes);
  const int64_t per_stream = side_by_side ? (end - begin) / G : 0;
  int64_t ids[G];
  for (int64_t i = 0; i < per_stream; ++i) {
    for (int g = 0; g < G; ++g) ids[g] = begin + g * per_stream + i;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
      group_block<S, kUnits, G>(p, p.tiles + ids[0] * tile_bytes, per_stream * tile_bytes, row0, rows, sums,
                                BlockPlan{b, ahead_blocks}, row_counts);
      epilogue(ids, G, row0, rows, sums);
    }
  }
  for (ids[0] = begin + G * per_stream; ids[0] < end; ++ids[0]) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
      group_block<S, kUnits, 1>(p, p.tiles + ids[0] * tile_bytes, 0, row0, rows, sums, BlockPlan{b, ahead_blocks},
                                row_counts);
      epilogue(ids, 1, row0, rows, sums);
    }
  }
}

// Batches trade streams for taller row blocks: AVX-512 linear 3 streams x 8 rows, gate_up 2 x 6.
// Measured (fp32, both threads, cold weights, ms streams-only vs traded): down [1024, 3584] at 8
// rows 0.52 vs 0.42, 16: 0.67 vs 0.61; gate_up [2 x 3584, 1024] at 16: 1.36 vs 1.23, 512: 34.8 vs
// 28.5. Linear keeps its 4 streams past 32 rows: a 512-token prefill's linear layers took 10%
// longer on 3.
template <class S, int kUnits, class Epilogue>
inline void for_tiles(const Problem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  constexpr int kBatchStreams = std::max(1, kUnits == 1 ? S::kStreams - 1 : S::kStreams / 2);
  constexpr int64_t kBatchMaxRows = kUnits == 1 ? 32 : std::numeric_limits<int64_t>::max();
  if (kBatchStreams < S::kStreams && p.rows > max_rows<S, kUnits, S::kStreams>() && p.rows <= kBatchMaxRows) {
    for_tile_streams<S, kUnits, kBatchStreams>(p, begin, end, epilogue);
  } else {
    for_tile_streams<S, kUnits, S::kStreams>(p, begin, end, epilogue);
  }
}

template <class S>
void linear_tiles(const Problem& p, int64_t begin, int64_t end) {
  for_tiles<S, 1>(p, begin, end, [&](const int64_t* ids, int tiles, int64_t row0, int64_t rows, const float* sums) {
    store_linear<typename S::Elem>(p, ids, tiles, row0, rows, sums);
  });
}

template <class S>
void silu_mul_tiles(const Problem& p, int64_t begin, int64_t end) {
  for_tiles<S, 2>(p, begin, end, [&](const int64_t* ids, int tiles, int64_t row0, int64_t rows, const float* sums) {
    store_silu_mul<typename S::Elem>(p, ids, tiles, row0, rows, sums);
  });
}

// The kernels' load loop without a batch's arithmetic: kStreams side-by-side streams over
// consecutive parts of the range, one FMA per line.
template <class S>
float read_lines(const uint8_t* data, int64_t lines) {
  constexpr int kStreams = S::kStreams;
  const int64_t per_stream = lines / kStreams;
  typename S::Acc acc[kStreams];
  for (auto& a : acc) a = S::zero();
  for (int64_t i = 0; i < per_stream; ++i) {
#pragma GCC unroll 32
    for (int g = 0; g < kStreams; ++g) {
      const uint8_t* line = data + (g * per_stream + i) * kStepBytes;
      __builtin_prefetch(line + kPrefetchBytes, 0, 3);
      S::step(acc[g], line, typename S::XVal{1});
    }
  }
  for (int64_t i = kStreams * per_stream; i < lines; ++i) S::step(acc[0], data + i * kStepBytes, typename S::XVal{1});
  for (int g = 1; g < kStreams; ++g) acc[0] = S::add(acc[0], acc[g]);
  alignas(64) float sums[kTileRows];
  S::store(acc[0], sums);
  return sums[0];
}

template <class S>
constexpr KernelSet kernel_set() {
  return KernelSet{&linear_tiles<S>, &silu_mul_tiles<S>, &read_lines<S>};
}
