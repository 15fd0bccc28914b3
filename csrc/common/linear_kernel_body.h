// The CPU linear kernels, written once over an ISA's step traits S and compiled once per ISA:
// each cpu/linear_<isa>.cpp includes this file inside its `#pragma GCC target` region and its own
// namespace (hence no include guard and no includes: common/linear_kernels.h comes first).
//
// S supplies, on top of Fp32Operands / Bf16Operands:
//   Acc                   16 fp32 partial sums (one row of x against 16 weight rows)
//   kStreams              tile sub-ranges read side by side (see below)
//   kAccumulators         Accs the registers hold at once, which bounds the rows per block
//   zero(), add(a, b), load(float[16]), store(acc, float[16])
//   step(acc, line, xval) acc += the 64-byte weight line times the broadcast activation value
//
// A tile is kUnits 16-row sub-tiles interleaved line by line (1 for linear; 2, gate and up, for
// silu_mul), so it is one contiguous run of memory. A thread splits its tiles into kStreams
// contiguous sub-ranges and walks them side by side, tile i of each at once: one core keeps more
// DRAM requests in flight over several long streams than over one, and the streams' accumulators are independent
// FMA chains. Loop order: tiles outer, row blocks inner; the first block reads the tiles from
// memory, further blocks of a large batch re-read them from cache, so DRAM sees each weight once
// per call whatever the batch.
//
// Past the rows the accumulators hold, a batch is compute-bound and runs in row blocks. Each block
// re-reads the group from L2 and prefetches a share of the next group into L2 (BlockPlan), so
// memory keeps streaming while the blocks compute. Batches also trade streams for taller blocks
// (for_tiles): fewer blocks, less L2 traffic per FMA.

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

// The steps [begin, end) of K a row block runs over: all of them, or one chunk (for_tile_streams).
struct StepRange {
  int64_t begin, end;
};

// sums[((g * kUnits + u) * M + m) * 16 + j] = x[m] . W[row j of sub-tile u of the tile of stream g]
// over the steps in `range`, for G tiles stream_stride bytes apart from `first`; with `resume`, added
// to what sums holds (the steps before the range), else from zero. With plan.blocks > 1
// the block also prefetches its share of what follows the range in each stream (as many lines).
// kIntoL1: the block prefetches into L1 (the next chunk, for_tile_streams), else into L2 (the next
// group). A template argument, as the step loop's branches on it were a tenth of its instructions.
template <class S, int kUnits, int M, int G, bool kIntoL1>
inline void group_rows(const Problem& p, const uint8_t* first, int64_t stream_stride, const typename S::Elem* x,
                       float* sums, bool resume, BlockPlan plan, StepRange range) {
  constexpr int64_t kLineBytes = kUnits * kStepBytes;  // one step of every sub-tile
  // The same lines in flight however many streams: one stream prefetches S::kStreams times as far.
  // A gate_up stream, which reads its lines in (gate, up) pairs, half as far: the full distance
  // overshoots it.
  constexpr int64_t kAheadBytes = kPrefetchBytes / kUnits * ((S::kStreams + G - 1) / G);
  // Every output is one chain of adds in K order, whatever the rows and the blocks: a row's result
  // does not depend on what else is in the batch (the engine's seeded sampling relies on it). Two
  // chains of even and odd steps for small batches gained only with weights in L2.
  typename S::Acc acc[G][kUnits][M];
  const auto at = [&](int g, int u, int m) { return sums + ((g * kUnits + u) * M + m) * kTileRows; };
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
    for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
      for (int m = 0; m < M; ++m) acc[g][u][m] = resume ? S::load(at(g, u, m)) : S::zero();
    }
  }
  const int64_t span = range.end - range.begin;
  // The next group's line to prefetch (in stream 0; stream g's is g * stream_stride on) advances
  // kUnits / blocks lines a step (at most one): a running remainder says when, a division per step
  // would cost more than the step's FMAs at large batches.
  const uint8_t* ahead_line = first + range.end * kLineBytes + plan.block * span * kUnits / plan.blocks * kStepBytes;
  int64_t ahead_rem = plan.block * span * kUnits % plan.blocks;
  // acc += the step's lines of every stream, times x[:, step] (or the odd-K tail pair).
  const auto accumulate = [&](int64_t step, bool partial) __attribute__((always_inline)) {
    bool ahead = false;
    if (plan.blocks > 1) {
      ahead_rem += kUnits;
      ahead = ahead_rem >= plan.blocks;
      if (ahead) {
        ahead_rem -= plan.blocks;
        ahead_line += kStepBytes;
      }
    }
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
      const uint8_t* lines = first + g * stream_stride + step * kLineBytes;
      if (ahead) __builtin_prefetch(ahead_line + g * stream_stride, 0, kIntoL1 ? 3 : 2);
#pragma GCC unroll 32
      for (int u = 0; u < kUnits; ++u) {
        // Chunked blocks skip it: the blocks of the chunk before put these lines in L1 already.
        if (!partial && !kIntoL1) __builtin_prefetch(lines + u * kStepBytes + kAheadBytes, 0, 3);
#pragma GCC unroll 32
        for (int m = 0; m < M; ++m) {
          const typename S::Elem* row = x + m * p.x_stride;
          S::step(acc[g][u][m], lines + u * kStepBytes, partial ? S::x_partial(row, step) : S::x_at(row, step));
        }
      }
    }
  };
  const int64_t full_end = std::min(range.end, p.k / S::kKPerStep);
  for (int64_t s = range.begin; s < full_end; ++s) accumulate(s, false);
  if (full_end < range.end) accumulate(full_end, true);  // bf16, odd K: (x[K-1], 0) x zero pad
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
    for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
      for (int m = 0; m < M; ++m) S::store(acc[g][u][m], at(g, u, m));
    }
  }
}

// Rows [row0, row0 + rows) of x against G tiles: picks the instantiation for `rows`.
template <class S, int kUnits, int G, bool kIntoL1, int... Ms>
inline void group_block(const Problem& p, const uint8_t* first, int64_t stream_stride, int64_t row0, int64_t rows,
                        float* sums, bool resume, BlockPlan plan, StepRange range,
                        std::integer_sequence<int, Ms...>) {
  const auto* x = static_cast<const typename S::Elem*>(p.x) + row0 * p.x_stride;
  ((rows == Ms + 1
        ? (group_rows<S, kUnits, Ms + 1, G, kIntoL1>(p, first, stream_stride, x, sums, resume, plan, range), true)
        : false) ||
   ...);
}

// The most bytes of tiles a large batch re-reads block after block (half the L2 of a core here).
constexpr int64_t kReusedBytes = 1 << 20;

// Batches of a few row blocks (decode batches) go through K in chunks of a group's tiles, every
// block over each chunk in turn, each block prefetching its share of the next chunk into L1: the
// chunk comes from memory once, the other blocks re-read it from L1, and the weights stream at an
// even pace while the blocks compute (whole K per block leaves memory idle while the later blocks
// compute from L2). Small chunks for few blocks, larger ones past 3 (the sizes that measured best);
// up to 8 blocks: 48 rows of linear, 48 of gate_up.
constexpr int64_t chunk_bytes(int64_t blocks) { return blocks <= 3 ? 16 << 10 : 32 << 10; }
constexpr int64_t kMaxChunkedBlocks = 8;

// Runs tiles [begin, end) as G side-by-side sub-ranges (and the few left over one by one), handing
// each set of tiles and row block to epilogue(tile_ids, tiles, row0, rows, sums). The rows go in
// blocks of equal size (16 rows of at most 14: 8 + 8, not 14 + 2) to keep each block's chains long.
template <class S, int kUnits, int G, class Epilogue>
inline void for_tile_streams(const Problem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  constexpr int R = max_rows<S, kUnits, G>();
  constexpr int64_t kBlockFloats = G * kUnits * R * kTileRows;
  alignas(64) float sums[kBlockFloats];
  const auto row_counts = std::make_integer_sequence<int, R>();
  const int64_t tile_bytes = p.steps * kUnits * kStepBytes;
  const int64_t blocks = (p.rows + R - 1) / R;
  const int64_t block_rows = (p.rows + blocks - 1) / blocks;
  const bool chunked = blocks > 1 && blocks <= kMaxChunkedBlocks;
  // The next group beside the current one must fit the L2 budget too (not so: fp32 down_proj, K 3584).
  const int64_t ahead_blocks = chunked || 2 * G * tile_bytes <= kReusedBytes ? blocks : 1;
  // Row blocks after the first re-read the G tiles: if those would not fit in L2 (long K), one
  // tile at a time (a chunk always fits).
  const bool side_by_side = G > 1 && (p.rows <= R || chunked || G * tile_bytes <= kReusedBytes);
  const int64_t per_stream = side_by_side ? (end - begin) / G : 0;
  const StepRange all_steps{.begin = 0, .end = p.steps};
  alignas(64) float block_sums[kMaxChunkedBlocks * kBlockFloats];  // each block's sums so far
  const int64_t chunk_steps = std::max<int64_t>(2, chunk_bytes(blocks) / (G * kUnits * kStepBytes));

  // Every row block against tiles ids[0 .. Gn) (Gn = G side by side, or 1 for the leftovers).
  const auto run_group = [&]<int Gn>(const int64_t* ids, int64_t stride) {
    const uint8_t* first = p.tiles + ids[0] * tile_bytes;
    if (!chunked) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
        group_block<S, kUnits, Gn, false>(p, first, stride, row0, rows, sums, false,
                                          BlockPlan{.block = b, .blocks = ahead_blocks}, all_steps, row_counts);
        epilogue(ids, Gn, row0, rows, sums);
      }
      return;
    }
    for (int64_t s0 = 0; s0 < p.steps; s0 += chunk_steps) {
      const StepRange chunk{.begin = s0, .end = std::min(p.steps, s0 + chunk_steps)};
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
        // Each chunk takes up the block's sums where the chunk before left them: the same chain
        // of adds as one pass over K.
        group_block<S, kUnits, Gn, true>(p, first, stride, row0, rows, block_sums + b * kBlockFloats, s0 > 0,
                                         BlockPlan{.block = b, .blocks = ahead_blocks}, chunk, row_counts);
      }
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
      epilogue(ids, Gn, row0, rows, block_sums + b * kBlockFloats);
    }
  };
  int64_t ids[G];
  for (int64_t i = 0; i < per_stream; ++i) {
    for (int g = 0; g < G; ++g) ids[g] = begin + g * per_stream + i;
    run_group.template operator()<G>(ids, per_stream * tile_bytes);
  }
  for (ids[0] = begin + G * per_stream; ids[0] < end; ++ids[0]) run_group.template operator()<1>(ids, 0);
}

// gate_up batches trade streams for taller row blocks (AVX-512: 2 streams x 6 rows, not 4 x 3): less
// L2 traffic per FMA. Linear keeps its 4 streams x 6 rows: with chunked K, fewer streams lose more
// bandwidth than taller blocks save.
template <class S, int kUnits, class Epilogue>
inline void for_tiles(const Problem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  constexpr int kBatchStreams = std::max(1, S::kStreams / 2);
  if constexpr (kUnits == 2 && kBatchStreams < S::kStreams) {
    if (p.rows > max_rows<S, kUnits, S::kStreams>()) {
      for_tile_streams<S, kUnits, kBatchStreams>(p, begin, end, epilogue);
      return;
    }
  }
  for_tile_streams<S, kUnits, S::kStreams>(p, begin, end, epilogue);
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
  return KernelSet{.linear = &linear_tiles<S>, .silu_mul = &silu_mul_tiles<S>, .read_lines = &read_lines<S>};
}
