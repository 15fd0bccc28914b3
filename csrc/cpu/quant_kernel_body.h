// The quantized CPU linear kernels, written once over an ISA's traits S and compiled once per ISA:
// each cpu/linear_quant_<isa>.cpp includes this file inside its `#pragma GCC target` region and its
// own namespace (hence no include guard and no includes: cpu/quant_kernels.h comes first).
//
// S supplies:
//   IAcc, FAcc             16 int32 / 16 fp32 lanes, one per output row of a tile
//   Params                 a group's 16 scales and zero points, widened
//   kStreams, kRegisters   tile sub-ranges read side by side; IAcc + FAcc pairs the registers hold
//   kInt4Registers         the pairs for int4 in one stream (prefill), whose lines take more registers
//   izero(), fzero()
//   line<kBits>(p)         a q line, unpacked as dot() wants it
//   dot<kBits>(acc, line, x)   acc += each row's products with the 4 (int8) or 8 (int4) activations at x
//   block(t, acc, d, x_sum)    t += d * acc (+ what dot() left out, e.g. an offset times x_sum)
//   params<kBits>(line)    the group's params line, zero points as quant::zero_point reads them
//   finish(res, t, params, x_group)   res[16] += scale * (t - zero * x_group)
//
// Every output is one chain of integer sums per block and one chain of fp32 fmas over the blocks
// in K order, whatever the rows, streams and ISA, so a row's result never depends on the rest of
// the batch (the engine's seeded sampling relies on it), and all ISAs agree bit for bit.

// The int32 sums fit: a block is 32 products of at most 255 * 127.
static_assert(quant::kActBlock * 255 * 127 < (int64_t{1} << 31));

// Rows of x per register block: one IAcc + FAcc pair per row, unit and stream.
template <class S, int kBits, int kUnits, int G>
constexpr int quant_max_rows() {
  return std::max(1, (kBits == 4 && G == 1 ? S::kInt4Registers : S::kRegisters) / (G * kUnits));
}

// sums[((g * kUnits + u) * M + m) * 16 + j] = row m (from row0) . row j of unit u of the tile of stream g,
// for G tiles stream_stride bytes apart from `first`.
template <class S, int kBits, int kUnits, int M, int G>
inline void quant_group_rows(const QuantProblem& p, const uint8_t* first, int64_t stream_stride, int64_t row0,
                             float* sums) {
  const quant::Geometry& geo = p.geometry;
  constexpr int64_t kLinesPerBlock = quant::kActBlock / quant::k_per_line(kBits);
  constexpr int64_t kAheadBytes = 40 * quant::kLineBytes;
  const int64_t blocks_per_group = geo.group_size / quant::kActBlock;
  const int64_t blocks = geo.padded_k / quant::kActBlock, groups = geo.groups();
  const auto res = [&](int g, int u, int m) { return sums + ((g * kUnits + u) * M + m) * quant::kTileRows; };
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < kUnits; ++u) {
      for (int m = 0; m < M; ++m) std::fill_n(res(g, u, m), quant::kTileRows, 0.f);
    }
  }
  for (int64_t group = 0; group < groups; ++group) {
    typename S::FAcc t[G][kUnits][M];
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
      for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
        for (int m = 0; m < M; ++m) t[g][u][m] = S::fzero();
      }
    }
    for (int64_t gb = 0; gb < blocks_per_group; ++gb) {
      const int64_t block = group * blocks_per_group + gb;
      typename S::IAcc acc[G][kUnits][M];
#pragma GCC unroll 32
      for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
        for (int u = 0; u < kUnits; ++u) {
#pragma GCC unroll 32
          for (int m = 0; m < M; ++m) acc[g][u][m] = S::izero();
        }
      }
      for (int64_t l = 0; l < kLinesPerBlock; ++l) {
        const int64_t k = block * quant::kActBlock + l * quant::k_per_line(kBits);
        const int64_t line_offset = (1 + gb * kLinesPerBlock + l) * quant::kLineBytes;
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
          for (int u = 0; u < kUnits; ++u) {
            const uint8_t* q = first + g * stream_stride + geo.group_offset(group, u) + line_offset;
            __builtin_prefetch(q + kAheadBytes, 0, 3);
            const auto w = S::template line<kBits>(q);
#pragma GCC unroll 32
            for (int m = 0; m < M; ++m) {
              acc[g][u][m] = S::template dot<kBits>(acc[g][u][m], w, p.x_q + (row0 + m) * geo.padded_k + k);
            }
          }
        }
      }
#pragma GCC unroll 32
      for (int m = 0; m < M; ++m) {
        const int64_t at = (row0 + m) * blocks + block;
        const float d = p.x_scale[at];
        const int32_t x_sum = p.x_sum[at];
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
          for (int u = 0; u < kUnits; ++u) t[g][u][m] = S::template block<kBits>(t[g][u][m], acc[g][u][m], d, x_sum);
        }
      }
    }
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g) {
#pragma GCC unroll 32
      for (int u = 0; u < kUnits; ++u) {
        const auto params = S::template params<kBits>(first + g * stream_stride + geo.group_offset(group, u));
#pragma GCC unroll 32
        for (int m = 0; m < M; ++m) {
          S::finish(res(g, u, m), t[g][u][m], params, p.x_group[(row0 + m) * groups + group]);
        }
      }
    }
  }
}

// Rows [row0, row0 + rows) against G tiles: picks the instantiation for `rows`.
template <class S, int kBits, int kUnits, int G, int... Ms>
inline void quant_group_block(const QuantProblem& p, const uint8_t* first, int64_t stream_stride, int64_t row0,
                              int64_t rows, float* sums, std::integer_sequence<int, Ms...>) {
  ((rows == Ms + 1 ? (quant_group_rows<S, kBits, kUnits, Ms + 1, G>(p, first, stream_stride, row0, sums), true)
                   : false) ||
   ...);
}

// Tiles [begin, end) as G side-by-side sub-ranges (the few left over one by one), every row block
// against each set of tiles; epilogue(tile_ids, tiles, row0, rows, sums).
template <class S, int kBits, int kUnits, int G, class Epilogue>
inline void quant_tile_streams(const QuantProblem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  constexpr int R = quant_max_rows<S, kBits, kUnits, G>();
  alignas(64) float sums[G * kUnits * R * quant::kTileRows];
  const auto row_counts = std::make_integer_sequence<int, R>();
  const int64_t tile_bytes = p.geometry.tile_bytes();
  const int64_t blocks = (p.rows + R - 1) / R;
  const int64_t block_rows = (p.rows + blocks - 1) / blocks;  // equal blocks keep each one's loops long
  const int64_t per_stream = (end - begin) / G;
  const auto run_group = [&]<int Gn>(const int64_t* ids, int64_t stride) {
    const uint8_t* first = p.tiles + ids[0] * tile_bytes;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t row0 = b * block_rows, rows = std::min<int64_t>(block_rows, p.rows - row0);
      quant_group_block<S, kBits, kUnits, Gn>(p, first, stride, row0, rows, sums, row_counts);
      epilogue(ids, Gn, row0, rows, sums);
    }
  };
  int64_t ids[G];
  for (int64_t i = 0; i < per_stream; ++i) {
    for (int g = 0; g < G; ++g) ids[g] = begin + g * per_stream + i;
    run_group.template operator()<G>(ids, per_stream * tile_bytes);
  }
  for (ids[0] = begin + G * per_stream; ids[0] < end; ++ids[0]) run_group.template operator()<1>(ids, 0);
}

// Rows that fit the registers beside S::kStreams streams read the weights as that many streams
// (decode: memory-bound); larger batches go one tile at a time in taller row blocks (compute-bound).
template <class S, int kBits, int kUnits, class Epilogue>
inline void quant_tiles(const QuantProblem& p, int64_t begin, int64_t end, Epilogue epilogue) {
  if (p.rows <= quant_max_rows<S, kBits, kUnits, S::kStreams>()) {
    quant_tile_streams<S, kBits, kUnits, S::kStreams>(p, begin, end, epilogue);
  } else {
    quant_tile_streams<S, kBits, kUnits, 1>(p, begin, end, epilogue);
  }
}

template <class S, int kBits>
void quant_linear_tiles(const QuantProblem& p, int64_t begin, int64_t end) {
  quant_tiles<S, kBits, 1>(p, begin, end, [&](const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                               const float* sums) {
    if (p.bf16_output) {
      store_linear<c10::BFloat16>(p.output, ids, tiles, row0, rows, sums);
    } else {
      store_linear<float>(p.output, ids, tiles, row0, rows, sums);
    }
  });
}

template <class S, int kBits>
void quant_silu_mul_tiles(const QuantProblem& p, int64_t begin, int64_t end) {
  quant_tiles<S, kBits, 2>(p, begin, end, [&](const int64_t* ids, int tiles, int64_t row0, int64_t rows,
                                              const float* sums) {
    if (p.bf16_output) {
      store_silu_mul<c10::BFloat16>(p.output, ids, tiles, row0, rows, sums);
    } else {
      store_silu_mul<float>(p.output, ids, tiles, row0, rows, sums);
    }
  });
}

template <class S>
constexpr QuantKernelSet quant_kernel_set() {
  return QuantKernelSet{.int8_linear = &quant_linear_tiles<S, 8>,
                        .int8_silu_mul = &quant_silu_mul_tiles<S, 8>,
                        .int4_linear = &quant_linear_tiles<S, 4>,
                        .int4_silu_mul = &quant_silu_mul_tiles<S, 4>};
}
