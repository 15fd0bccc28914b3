// paged_attention on CPU: prefill, chunked prefill and decode in one flash-style kernel.
//
// The work is cut into tasks; each folds a range of cached keys into the online softmax of a set of
// query rows, a row being one (query, query head) pair. Two shapes of task:
//   decode-like  (a sequence with few queries, q_len * group < 16): every kv head of the sequence
//                in one task, so each cached token's K and V rows (all heads, contiguous) stream
//                through once and are widened to fp32 as they load. Scores are dot products reduced
//                four rows at a time. In a batch too small to go round the threads a sequence is
//                split by kv head, and a long one always by key range over several tasks whose
//                partial softmax states are merged at the end, so one decode keeps every core busy.
//   prefill-like (many queries): one kv head and a run of about kTargetRows rows per task. Each tile
//                of K/V is widened once into scratch and reused by every row; scores come from an
//                outer-product kernel over Q transposed, which needs no horizontal sums. For bf16
//                caches on CPUs with AMX, scores and P V both run on the tile unit instead, K and V
//                read unwidened (cpu/attention_amx.h).
// Either way the heads of a GQA group share their K/V reads. Per tile of kKeyTile keys: scores (in
// the log2 domain), the mask on tiles that cross a causal or window edge, an online-softmax update
// vectorised across rows, then acc = acc * rescale + P V.
//
// Threads pull tasks from a shared counter, costliest first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/attention.h"
#include "common/cache.h"
#include "common/dispatch.h"
#include "cpu/attention_amx.h"
#include "cpu/ops_cpu.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cpu::kLanes;
using cpu::vfloat;

constexpr int64_t kKeyTile = 32;        // keys scored and accumulated per step
constexpr int64_t kTargetRows = 64;     // rows of a prefill-like task
constexpr int64_t kRowBlock = 4;        // query rows held in registers at once
constexpr int64_t kKeyBlock = 4;        // keys held in registers at once (outer-product scores)
constexpr int64_t kVectorBlock = 4;     // 16-lane vectors held in registers per row or key
// A decode-like task's keys go in parts of this many, each its own task, their partial softmax
// states merged in order: whatever the batch, so a query's result never depends on what else is in
// it (the engine's seeded sampling relies on that).
constexpr int64_t kSplitKeys = 512;
constexpr int64_t kTasksPerThread = 2;  // enough tasks to even out the threads' shares
constexpr int64_t kCacheLine = 64;      // bytes the prefetches ask for at a time

template <typename T>
struct Problem {
  T* out;
  const T* q;
  const T* k_cache;
  const T* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  int64_t out_token_stride, q_token_stride;
  int64_t num_kv_heads, group, head_dim, padded_dim, block_size, max_blocks;
  float scale_log2;  // softmax scale times log2(e): scores come out in the log2 domain
  int64_t sliding_window;
  bool amx_prefill;  // prefill-like tasks run on AMX (bf16 caches, head_dim % 32 == 0, AMX selected)
};

// Queries [first_query, first_query + num_queries) of sequence `seq` (counted within its q rows), for
// the query heads of kv heads [kv_head_begin, + num_kv_heads), against cache positions
// [key_begin, key_end). Row r is query first_query + (r / group) % num_queries, query head
// kv_head_begin * group + r / group / num_queries * group + r % group.
struct Task {
  int64_t seq, kv_head_begin, num_kv_heads, first_query, num_queries, key_begin, key_end;
  int64_t partial;  // offset of its slot in the partials buffer when split by keys, else -1
  int64_t cost;
  // Prefill-like: outer-product (or AMX) scores for all its rows, even a run of a few queries at a
  // chunk's end, so a query's result does not depend on where its prompt was cut into chunks.
  bool prefill;

  int64_t rows(int64_t group) const { return num_kv_heads * num_queries * group; }
  int64_t row_query(int64_t r, int64_t group) const { return first_query + r / group % num_queries; }
  int64_t row_head(int64_t r, int64_t group) const {
    return (kv_head_begin + r / group / num_queries) * group + r % group;
  }
};

// The tasks of one sequence split by key range; `whole` spans them all, its partial is the first slot.
struct SplitGroup {
  Task whole;
  int64_t num_splits, slot_floats;
};

// A split task's slot holds acc [rows, padded_dim], then the row maxima, then the row sums.
int64_t slot_floats(int64_t rows, int64_t padded_dim) { return rows * (padded_dim + 2); }

struct Plan {
  std::vector<Task> tasks;
  std::vector<SplitGroup> split_groups;
  int64_t max_rows = 0, partial_floats = 0;
  bool prefill_like = false;  // any task with the rows for the outer-product (or AMX) scores
};

// Per-thread working memory, sized for the largest task. It is carved from a thread-local arena
// that outlives the call, so each decode step reuses it instead of allocating and zeroing it anew;
// a task writes every part before reading it. Row-major buffers have padded_dim columns (head_dim
// rounded up to whole vectors, zero filled); padded_rows rounds rows up likewise.
struct Scratch {
  Scratch(int64_t max_rows, int64_t padded_dim, int64_t num_kv_heads) {
    const int64_t padded_rows = cpu::round_up_to_lanes(max_rows);
    const int64_t staged = kKeyTile * num_kv_heads * padded_dim;
    const std::pair<float**, int64_t> parts[] = {
        {&queries, max_rows * padded_dim}, {&queries_t, padded_dim * padded_rows}, {&acc, padded_rows * padded_dim},
        {&scores, kKeyTile * padded_rows}, {&keys, staged}, {&values, staged}, {&row_max, padded_rows},
        {&row_sum, padded_rows}, {&rescale, padded_rows}};
    int64_t total = 0;
    for (const auto& part : parts) total += part.second;
    thread_local std::vector<float> arena;
    if (static_cast<int64_t>(arena.size()) < total) arena.resize(total);
    float* next = arena.data();
    for (const auto& [view, size] : parts) {
      *view = next;
      next += size;
    }
  }

  float* queries;    // [rows, padded_dim], pre-scaled by scale * log2(e)
  float* queries_t;  // [padded_dim, padded_rows], for the outer-product scores
  float* acc;        // [rows (rounded up to 16), padded_dim], unnormalised output
  float* scores;     // [kKeyTile, padded_rows]: scores, then probabilities
  float* keys;       // [kKeyTile, heads, padded_dim]: K/V widened to fp32 where staged
  float* values;
  float* row_max;  // [padded_rows], online softmax state
  float* row_sum;
  float* rescale;
};

// Calls f(std::integral_constant<int64_t, n>) for 1 <= n <= Max: runtime block sizes to templates.
template <int64_t Max, typename F>
MG_ALWAYS_INLINE void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, f);
  }
  f(std::integral_constant<int64_t, Max>{});
}

// K or V rows of one tile: rows[j] + h * head_stride is kv head h (counted within the task) of key j.
template <typename E>
struct TileRows {
  const E* rows[kKeyTile];
  int64_t head_stride;
};

// The next tile's K and V rows, asked for a few cache lines at every key the current tile folds: a
// sequence's blocks are scattered by the block table, which the hardware prefetchers cannot follow.
// Asking for the whole tile at once (more than L1 holds) stalls the core on its fill buffers and
// leaves memory idle while the tile computes; spread out, the loads overlap the arithmetic.
template <typename T>
struct NextTilePrefetch {
  const T* const* keys = nullptr;  // the next tile's rows (none: rows 0)
  const T* const* values = nullptr;
  int64_t rows = 0, lines_per_row = 0;
  int64_t per_key = 0;  // lines asked for at each key of each pass over the current tile
  int64_t next = 0;     // lines asked for so far: all keys' lines, then all values'
  // Where `next` is, kept as it advances: a division per line (64-bit, the row length is a run-time
  // value) cost more than the line's arithmetic.
  int64_t row = 0, line = 0;

  MG_ALWAYS_INLINE void some() { ask(std::min(next + per_key, 2 * rows * lines_per_row)); }
  MG_ALWAYS_INLINE void rest() { ask(2 * rows * lines_per_row); }

 private:
  MG_ALWAYS_INLINE void ask(int64_t end) {
    for (; next < end; ++next) {
      const T* base = row < rows ? keys[row] : values[row - rows];
      __builtin_prefetch(reinterpret_cast<const char*>(base) + line * kCacheLine);
      if (++line == lines_per_row) {
        line = 0;
        ++row;
      }
    }
  }
};

// scores[j, r] = q_r . k_j for R <= 4 rows, one key at a time: few rows, so no reuse to win by
// staging K; its rows are widened as they load.
template <int64_t R, typename E, typename Prefetch>
MG_ALWAYS_INLINE void score_rows(const float* queries, int64_t padded_dim, const E* const* keys, int64_t offset,
                                 int64_t kt, int64_t head_dim, float* scores, int64_t padded_rows,
                                 Prefetch& next_tile) {
  for (int64_t j = 0; j < kt; ++j) {
    next_tile.some();
    const E* key = keys[j] + offset;
    vfloat acc[kRowBlock] = {};
    int64_t d = 0;
    for (; d + kLanes <= head_dim; d += kLanes) {
      const vfloat k = cpu::load(key + d);
      for (int64_t r = 0; r < R; ++r) acc[r] += cpu::load(queries + r * padded_dim + d) * k;
    }
    if (d < head_dim) {
      const vfloat k = cpu::load_partial(key + d, head_dim - d);
      for (int64_t r = 0; r < R; ++r) acc[r] += cpu::load(queries + r * padded_dim + d) * k;
    }
    const vfloat sums = cpu::reduce_sum4(acc[0], acc[1], acc[2], acc[3]);
    for (int64_t r = 0; r < R; ++r) scores[j * padded_rows + r] = sums[4 * r];
  }
}

// scores[j, 16 NV rows] for J keys as outer products of key elements with rows of Q^T: many rows.
template <int64_t J, int64_t NV, typename E>
MG_ALWAYS_INLINE void score_keys(const float* queries_t, int64_t padded_rows, const E* const* keys, int64_t head_dim,
                                 float* scores) {
  vfloat acc[J][NV] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    vfloat q[NV];
    for (int64_t v = 0; v < NV; ++v) q[v] = cpu::load(queries_t + d * padded_rows + v * kLanes);
    for (int64_t j = 0; j < J; ++j) {
      const vfloat k = cpu::splat(static_cast<float>(keys[j][d]));
      for (int64_t v = 0; v < NV; ++v) acc[j][v] += k * q[v];
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t v = 0; v < NV; ++v) cpu::store(scores + j * padded_rows + v * kLanes, acc[j][v]);
  }
}

// acc[r, d0 : d0 + 16 NV] = acc * rescale[r] + sum_j probs[j, r] v_j for R rows. Value rows are whole
// vectors wide (head_dim a multiple of 16, or staged with zero padding).
template <int64_t R, int64_t NV, typename E, typename Prefetch>
MG_ALWAYS_INLINE void accumulate_values(float* acc_rows, int64_t padded_dim, const float* rescale, const float* probs,
                                        int64_t padded_rows, const E* const* values, int64_t offset, int64_t kt,
                                        int64_t d0, Prefetch& next_tile) {
  vfloat acc[R][NV];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = cpu::load(acc_rows + r * padded_dim + d0 + v * kLanes) * rescale[r];
  }
  for (int64_t j = 0; j < kt; ++j) {
    next_tile.some();
    vfloat val[NV];
    for (int64_t v = 0; v < NV; ++v) val[v] = cpu::load(values[j] + offset + d0 + v * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const vfloat prob = cpu::splat(probs[j * padded_rows + r]);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += prob * val[v];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) cpu::store(acc_rows + r * padded_dim + d0 + v * kLanes, acc[r][v]);
  }
}

// Turns a tile's scores into probabilities, vectorised across rows, and updates each row's running
// max and sum; leaves in s.rescale the factor each row's acc must be scaled by.
MG_ALWAYS_INLINE void softmax_tile(Scratch& s, int64_t kt, int64_t padded_rows) {
  for (int64_t r0 = 0; r0 < padded_rows; r0 += kLanes) {
    vfloat tile_max = cpu::splat(-INFINITY);
    for (int64_t j = 0; j < kt; ++j) tile_max = cpu::max(tile_max, cpu::load(&s.scores[j * padded_rows + r0]));
    vfloat running_max = cpu::load(&s.row_max[r0]), base;
    const vfloat rescale = online_softmax_update(running_max, tile_max, base, cpu::Exp2{});
    vfloat sum{};
    for (int64_t j = 0; j < kt; ++j) {
      float* score = &s.scores[j * padded_rows + r0];
      const vfloat prob = cpu::exp2(cpu::load(score) - base);
      cpu::store(score, prob);
      sum += prob;
    }
    cpu::store(&s.row_max[r0], running_max);
    cpu::store(&s.row_sum[r0], cpu::load(&s.row_sum[r0]) * rescale + sum);
    cpu::store(&s.rescale[r0], rescale);
  }
}

// -inf for the scores of keys [k0, k0 + kt) that rows cannot see (causal or window edge). Row by row:
// a row's position costs two divisions, which per score took a sixth of a bf16 prefill's attention.
template <typename T>
MG_ALWAYS_INLINE void mask_tile(const Problem<T>& p, const Task& task, Scratch& s, int64_t k0, int64_t kt,
                                int64_t first_pos) {
  const int64_t rows = task.rows(p.group), padded_rows = cpu::round_up_to_lanes(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = first_pos + r / p.group % task.num_queries;
    for (int64_t j = 0; j < kt; ++j) {
      if (!key_visible(k0 + j, pos, p.sliding_window)) s.scores[j * padded_rows + r] = -INFINITY;
    }
  }
}

// One tile's scores, mask, softmax update and P V, for K/V rows of element type E; asks for the next
// tile's lines along the way.
template <typename T, typename E>
MG_ALWAYS_INLINE void fold_tile(const Problem<T>& p, const Task& task, Scratch& s, const TileRows<E>& keys,
                                const TileRows<E>& values, int64_t k0, int64_t kt, int64_t first_pos, bool masked,
                                NextTilePrefetch<T>& next_tile) {
  const int64_t group = p.group, padded_dim = p.padded_dim, head_dim = p.head_dim;
  const int64_t rows_per_head = task.num_queries * group, rows = task.rows(group);
  const int64_t padded_rows = cpu::round_up_to_lanes(rows);
  if (task.prefill) {  // a single kv head
    next_tile.rest();  // its outer products load each key element alone: no loop to spread over
    const int64_t row_vectors = padded_rows / kLanes;
    for (int64_t j0 = 0; j0 < kt; j0 += kKeyBlock) {
      for (int64_t v0 = 0; v0 < row_vectors; v0 += kVectorBlock) {
        with_count<kKeyBlock>(std::min(kKeyBlock, kt - j0), [&](auto nk) MG_ALWAYS_INLINE_LAMBDA {
          with_count<kVectorBlock>(std::min(kVectorBlock, row_vectors - v0), [&](auto nv) MG_ALWAYS_INLINE_LAMBDA {
            score_keys<decltype(nk)::value, decltype(nv)::value>(&s.queries_t[v0 * kLanes], padded_rows,
                                                                 keys.rows + j0, head_dim,
                                                                 &s.scores[j0 * padded_rows + v0 * kLanes]);
          });
        });
      }
    }
  } else {
    for (int64_t h = 0; h < task.num_kv_heads; ++h) {
      for (int64_t r0 = h * rows_per_head; r0 < (h + 1) * rows_per_head; r0 += kRowBlock) {
        with_count<kRowBlock>(std::min(kRowBlock, (h + 1) * rows_per_head - r0), [&](auto nr) MG_ALWAYS_INLINE_LAMBDA {
          score_rows<decltype(nr)::value>(&s.queries[r0 * padded_dim], padded_dim, keys.rows, h * keys.head_stride,
                                          kt, head_dim, &s.scores[r0], padded_rows, next_tile);
        });
      }
    }
  }
  if (masked) mask_tile(p, task, s, k0, kt, first_pos);

  softmax_tile(s, kt, padded_rows);
  next_tile.some();

  const int64_t dim_vectors = padded_dim / kLanes;
  for (int64_t h = 0; h < task.num_kv_heads; ++h) {
    const int64_t head_end = (h + 1) * rows_per_head;
    for (int64_t r0 = h * rows_per_head; r0 < head_end; r0 += kRowBlock) {
      for (int64_t v0 = 0; v0 < dim_vectors; v0 += kVectorBlock) {
        with_count<kRowBlock>(std::min(kRowBlock, head_end - r0), [&](auto nr) MG_ALWAYS_INLINE_LAMBDA {
          with_count<kVectorBlock>(std::min(kVectorBlock, dim_vectors - v0), [&](auto nv) MG_ALWAYS_INLINE_LAMBDA {
            accumulate_values<decltype(nr)::value, decltype(nv)::value>(
                &s.acc[r0 * padded_dim], padded_dim, &s.rescale[r0], &s.scores[r0], padded_rows, values.rows,
                h * values.head_stride, kt, v0 * kLanes, next_tile);
          });
        });
      }
    }
  }
}

// Widens `heads` consecutive head rows of each of kt cache rows into zero-padded fp32 scratch.
template <typename T>
MG_ALWAYS_INLINE void stage_rows(const T* const* src, int64_t kt, int64_t heads, int64_t head_dim, int64_t padded_dim,
                                 float* staging, TileRows<float>& staged) {
  for (int64_t j = 0; j < kt; ++j) {
    float* dst = staging + j * heads * padded_dim;
    for (int64_t h = 0; h < heads; ++h) {
      cpu::for_each_lane_step(head_dim, [&](int64_t d, int64_t n) MG_ALWAYS_INLINE_LAMBDA {
        cpu::store(dst + h * padded_dim + d, cpu::load_n(src[j] + h * head_dim + d, n));
      });
    }
    staged.rows[j] = dst;
  }
  staged.head_stride = padded_dim;
}

template <typename T>
MG_ALWAYS_INLINE void locate_rows(const Problem<T>& p, const Task& task, int64_t k0, int64_t kt, const T** key_rows,
                                  const T** value_rows) {
  const int32_t* block_table = p.block_tables + task.seq * p.max_blocks;
  for (int64_t j = 0; j < kt; ++j) {
    const int64_t offset = cache_offset(slot_of_position(block_table, k0 + j, p.block_size), task.kv_head_begin,
                                        p.num_kv_heads, p.head_dim);
    key_rows[j] = p.k_cache + offset;
    value_rows[j] = p.v_cache + offset;
  }
}

// The AMX path's working memory, kept per thread like Scratch's arena.
struct AmxScratch {
  std::vector<const c10::BFloat16*> q_rows;
  std::vector<uint16_t> packed_q, key_staging, pv_staging;

  static AmxScratch& of_this_thread(int64_t rows, int64_t head_dim) {
    thread_local AmxScratch scratch;
    scratch.q_rows.resize(rows);
    scratch.packed_q.resize(attention_amx::packed_queries_size(rows, head_dim));
    scratch.key_staging.resize(attention_amx::kKeys * head_dim);
    scratch.pv_staging.resize(attention_amx::pv_staging_size(head_dim));
    return scratch;
  }
};

// Offset of row r's head_dim values in a [tokens, heads, head_dim] tensor whose tokens lie
// token_stride apart (q or out): its query's token, its query head.
MG_ALWAYS_INLINE int64_t row_offset(const Task& task, int64_t q_start, int64_t r, int64_t group, int64_t token_stride,
                                    int64_t head_dim) {
  return (q_start + task.row_query(r, group)) * token_stride + task.row_head(r, group) * head_dim;
}

template <typename T>
MG_ALWAYS_INLINE const T* query_row(const Problem<T>& p, const Task& task, int64_t q_start, int64_t r) {
  return p.q + row_offset(task, q_start, r, p.group, p.q_token_stride, p.head_dim);
}

template <typename T>
MG_ALWAYS_INLINE T* output_row(const Problem<T>& p, const Task& task, int64_t q_start, int64_t r) {
  return p.out + row_offset(task, q_start, r, p.group, p.out_token_stride, p.head_dim);
}

// The AMX path's queries: Q^T of the task's rows packed as B tiles (bf16 caches only; the AMX path
// never runs for other types, which get no scratch).
template <typename T>
MG_ALWAYS_INLINE AmxScratch* pack_amx_queries(const Problem<T>& p, const Task& task, int64_t q_start) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t rows = task.rows(p.group);
    AmxScratch& amx_scratch = AmxScratch::of_this_thread(rows, p.head_dim);
    for (int64_t r = 0; r < rows; ++r) amx_scratch.q_rows[r] = query_row(p, task, q_start, r);
    attention_amx::pack_queries(amx_scratch.q_rows.data(), rows, p.head_dim, amx_scratch.packed_q.data());
    return &amx_scratch;
  }
  return nullptr;
}

// The vector paths' queries: each row widened into s.queries, pre-scaled by scale * log2(e).
template <typename T>
MG_ALWAYS_INLINE void scale_queries(const Problem<T>& p, const Task& task, int64_t q_start, Scratch& s) {
  const int64_t head_dim = p.head_dim, padded_dim = p.padded_dim, rows = task.rows(p.group);
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = query_row(p, task, q_start, r);
    float* dst = &s.queries[r * padded_dim];
    cpu::for_each_lane_step(head_dim, [&](int64_t d, int64_t n) MG_ALWAYS_INLINE_LAMBDA {
      cpu::store(dst + d, cpu::load_n(src + d, n) * p.scale_log2);
    });
  }
}

// Q^T for the outer-product scores: s.queries transposed into s.queries_t, zero past `rows`.
MG_ALWAYS_INLINE void transpose_queries(Scratch& s, int64_t rows, int64_t head_dim, int64_t padded_dim) {
  const int64_t padded_rows = cpu::round_up_to_lanes(rows);
  std::fill(s.queries_t, s.queries_t + padded_dim * padded_rows, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < head_dim; ++d) s.queries_t[d * padded_rows + r] = s.queries[r * padded_dim + d];
  }
}

// The online softmax's start: acc and scores zero, every row's running max -inf and sum 0.
MG_ALWAYS_INLINE void reset_rows(Scratch& s, int64_t padded_rows, int64_t padded_dim) {
  std::fill(s.acc, s.acc + padded_rows * padded_dim, 0.f);  // AMX's P V runs whole 16-row blocks
  std::fill(s.scores, s.scores + kKeyTile * padded_rows, 0.f);  // rows past `rows` stay 0
  std::fill(s.row_max, s.row_max + padded_rows, -INFINITY);
  std::fill(s.row_sum, s.row_sum + padded_rows, 0.f);
}

// The prefetches of the tile after [k0, k0 + kt), spread over the `passes` passes the current tile
// makes over its keys; none after the task's last tile. The next tile's rows go in next_keys and
// next_values, which the prefetch reads from.
template <typename T>
MG_ALWAYS_INLINE NextTilePrefetch<T> next_tile_prefetch(const Problem<T>& p, const Task& task, int64_t k0, int64_t kt,
                                                        int64_t passes, int64_t lines_per_row, TileRows<T>& next_keys,
                                                        TileRows<T>& next_values) {
  NextTilePrefetch<T> next_tile;
  if (k0 + kKeyTile < task.key_end) {
    const int64_t next_kt = std::min(kKeyTile, task.key_end - k0 - kKeyTile);
    locate_rows(p, task, k0 + kKeyTile, next_kt, next_keys.rows, next_values.rows);
    const int64_t steps = passes * kt + 1;
    next_tile = {.keys = next_keys.rows, .values = next_values.rows, .rows = next_kt,
                 .lines_per_row = lines_per_row,
                 .per_key = (2 * next_kt * lines_per_row + steps - 1) / steps};
  }
  return next_tile;
}

// One tile's scores, mask, softmax update and P V on the tile unit: K and V go to it as they are.
MG_ALWAYS_INLINE void fold_tile_amx(const Problem<c10::BFloat16>& p, const Task& task, Scratch& s,
                                    AmxScratch& amx_scratch, const TileRows<c10::BFloat16>& key_rows,
                                    const TileRows<c10::BFloat16>& value_rows, int64_t k0, int64_t kt,
                                    int64_t first_pos, bool masked, int64_t padded_rows) {
  attention_amx::score_tile(amx_scratch.packed_q.data(), padded_rows, p.head_dim, key_rows.rows, kt, p.scale_log2,
                            s.scores, amx_scratch.key_staging.data());
  if (masked) mask_tile(p, task, s, k0, kt, first_pos);
  softmax_tile(s, kt, padded_rows);
  attention_amx::accumulate_tile(s.scores, s.rescale, padded_rows, value_rows.rows, kt, p.head_dim, s.acc,
                                 amx_scratch.pv_staging.data());
}

// Folds the task's keys into its rows' softmax state and acc, a tile of kKeyTile keys at a time: on
// the tile unit when amx_scratch is given (pack_amx_queries), else on the vector paths.
template <typename T>
MG_ALWAYS_INLINE void fold_keys(const Problem<T>& p, const Task& task, Scratch& s, AmxScratch* amx_scratch,
                                int64_t first_pos) {
  const int64_t group = p.group, head_dim = p.head_dim, padded_dim = p.padded_dim, heads = task.num_kv_heads;
  const int64_t padded_rows = cpu::round_up_to_lanes(task.rows(group));
  // Staging pays off when many rows reuse each K/V row, or when rows need zero padding.
  const bool stage = task.prefill ? !std::is_same_v<T, float> || head_dim != padded_dim : head_dim % kLanes != 0;
  const int64_t last_pos = first_pos + task.num_queries - 1;
  // Tiles wholly inside every row's visible range skip the mask.
  const int64_t unmasked_begin = first_visible_key(last_pos, p.sliding_window), unmasked_end = first_pos + 1;
  const int64_t lines_per_row = (heads * head_dim * static_cast<int64_t>(sizeof(T)) + kCacheLine - 1) / kCacheLine;
  // Passes fold_tile makes over a tile's keys (decode-like): a score pass per block of rows, a P V
  // pass per block of rows and of vectors; plus one step at the softmax.
  const int64_t row_blocks = heads * ((task.num_queries * group + kRowBlock - 1) / kRowBlock);
  const int64_t passes = row_blocks * (1 + (padded_dim / kLanes + kVectorBlock - 1) / kVectorBlock);
  TileRows<T> key_rows, value_rows;
  TileRows<T> next_keys, next_values;
  key_rows.head_stride = value_rows.head_stride = head_dim;
  for (int64_t k0 = task.key_begin; k0 < task.key_end; k0 += kKeyTile) {
    const int64_t kt = std::min(kKeyTile, task.key_end - k0);
    locate_rows(p, task, k0, kt, key_rows.rows, value_rows.rows);
    NextTilePrefetch<T> next_tile = next_tile_prefetch(p, task, k0, kt, passes, lines_per_row, next_keys, next_values);
    const bool masked = k0 < unmasked_begin || k0 + kt > unmasked_end;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (amx_scratch != nullptr) {
        fold_tile_amx(p, task, s, *amx_scratch, key_rows, value_rows, k0, kt, first_pos, masked, padded_rows);
        next_tile.rest();
        continue;
      }
    }
    if (stage) {
      TileRows<float> staged_keys, staged_values;
      stage_rows(key_rows.rows, kt, heads, head_dim, padded_dim, s.keys, staged_keys);
      stage_rows(value_rows.rows, kt, heads, head_dim, padded_dim, s.values, staged_values);
      fold_tile(p, task, s, staged_keys, staged_values, k0, kt, first_pos, masked, next_tile);
    } else {
      fold_tile(p, task, s, key_rows, value_rows, k0, kt, first_pos, masked, next_tile);
    }
    next_tile.rest();  // any the rounding left
  }
}

// A split task's state into its slot of the partials: acc, then the row maxima, then the row sums.
MG_ALWAYS_INLINE void save_partial(const Scratch& s, int64_t rows, int64_t padded_dim, float* slot) {
  std::copy(s.acc, s.acc + rows * padded_dim, slot);
  std::copy(s.row_max, s.row_max + rows, slot + rows * padded_dim);
  std::copy(s.row_sum, s.row_sum + rows, slot + rows * padded_dim + rows);
}

// The task's output rows: acc over each row's sum, in out's dtype.
template <typename T>
MG_ALWAYS_INLINE void write_rows(const Problem<T>& p, const Task& task, const Scratch& s, int64_t q_start) {
  const int64_t rows = task.rows(p.group);
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = output_row(p, task, q_start, r);
    const float inv_sum = s.row_sum[r] > 0.f ? 1.f / s.row_sum[r] : 0.f;
    const float* src = &s.acc[r * p.padded_dim];
    cpu::for_each_lane_step(p.head_dim, [&](int64_t d, int64_t n) MG_ALWAYS_INLINE_LAMBDA {
      cpu::store_n(dst + d, cpu::load(src + d) * inv_sum, n);
    });
  }
}

template <typename T>
MG_ALWAYS_INLINE void run_task(const Problem<T>& p, const Task& task, Scratch& s, float* partials) {
  const int64_t rows = task.rows(p.group);
  const bool amx = task.prefill && p.amx_prefill;
  const int64_t seq_len = p.seq_lens[task.seq];
  const int64_t q_start = p.query_start_loc[task.seq], q_len = p.query_start_loc[task.seq + 1] - q_start;
  const int64_t first_pos = query_position(seq_len, q_len, task.first_query);

  AmxScratch* amx_scratch = amx ? pack_amx_queries(p, task, q_start) : nullptr;
  if (!amx) {
    scale_queries(p, task, q_start, s);
    if (task.prefill) transpose_queries(s, rows, p.head_dim, p.padded_dim);
  }
  reset_rows(s, cpu::round_up_to_lanes(rows), p.padded_dim);
  fold_keys(p, task, s, amx_scratch, first_pos);
  if (task.partial >= 0) {
    save_partial(s, rows, p.padded_dim, partials + task.partial);
  } else {
    write_rows(p, task, s, q_start);
  }
}

struct ScalarExp2 {
  float operator()(float x) const { return std::exp2(x); }
};

// Combines the partial softmax states of a sequence's key-range splits into its output rows.
template <typename T>
MG_ALWAYS_INLINE void merge_splits(const Problem<T>& p, const SplitGroup& split, const float* partials,
                                   float* merged) {
  const Task& task = split.whole;
  const int64_t group = p.group, padded_dim = p.padded_dim, rows = task.rows(group);
  const int64_t q_start = p.query_start_loc[task.seq];
  for (int64_t r = 0; r < rows; ++r) {
    float running_max = -INFINITY, sum = 0.f;
    std::fill(merged, merged + padded_dim, 0.f);
    for (int64_t i = 0; i < split.num_splits; ++i) {
      const float* slot = partials + task.partial + i * split.slot_floats;
      float weight_merged, weight_split;
      running_max = merge_softmax_weights(running_max, slot[rows * padded_dim + r], weight_merged, weight_split,
                                          ScalarExp2{});
      sum = sum * weight_merged + slot[rows * padded_dim + rows + r] * weight_split;
      for (int64_t d = 0; d < padded_dim; d += kLanes) {
        const vfloat part = cpu::load(slot + r * padded_dim + d);
        cpu::store(merged + d, cpu::load(merged + d) * weight_merged + part * weight_split);
      }
    }
    T* dst = output_row(p, task, q_start, r);
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    cpu::for_each_lane_step(p.head_dim, [&](int64_t d, int64_t n) MG_ALWAYS_INLINE_LAMBDA {
      cpu::store_n(dst + d, cpu::load(merged + d) * inv_sum, n);
    });
  }
}

template <typename T>
MG_CPU_CLONES void run_tasks(const Problem<T>& p, const Plan& plan, std::atomic<int64_t>& next, float* partials) {
  Scratch scratch(plan.max_rows, p.padded_dim, p.num_kv_heads);
  const bool amx = p.amx_prefill && plan.prefill_like;
  if (amx) attention_amx::begin();
  const int64_t num_tasks = static_cast<int64_t>(plan.tasks.size());
  for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) {
    run_task(p, plan.tasks[i], scratch, partials);
  }
  if (amx) attention_amx::end();
}

template <typename T>
MG_CPU_CLONES void merge_split_groups(const Problem<T>& p, const Plan& plan, int64_t begin, int64_t end,
                                      const float* partials) {
  std::vector<float> merged(p.padded_dim);
  for (int64_t g = begin; g < end; ++g) merge_splits(p, plan.split_groups[g], partials, merged.data());
}

// Queries per prefill-like task: enough rows (queries x group) for the outer-product kernel.
int64_t queries_per_task(int64_t group) { return std::max<int64_t>(1, kTargetRows / group); }

bool decode_like(int64_t q_len, int64_t group) { return q_len * group < kLanes; }

// One decode-like task, or its split by key range into parts of kSplitKeys keys whose partial
// softmax states merge_splits combines.
void add_decode_task(Plan& plan, const Task& whole, int64_t group, int64_t padded_dim) {
  const int64_t rows = whole.rows(group), keys = whole.key_end - whole.key_begin;
  plan.max_rows = std::max(plan.max_rows, rows);
  const int64_t splits = std::max<int64_t>(1, (keys + kSplitKeys - 1) / kSplitKeys);
  if (splits == 1) {
    plan.tasks.push_back(whole);
    plan.tasks.back().cost = rows * keys;
    return;
  }
  SplitGroup group_of_splits{.whole = whole, .num_splits = splits, .slot_floats = slot_floats(rows, padded_dim)};
  group_of_splits.whole.partial = plan.partial_floats;
  for (int64_t i = 0; i < splits; ++i) {
    Task part = whole;
    part.key_begin = whole.key_begin + i * kSplitKeys;
    part.key_end = std::min(whole.key_end, part.key_begin + kSplitKeys);
    part.partial = plan.partial_floats + i * group_of_splits.slot_floats;
    part.cost = rows * (part.key_end - part.key_begin);
    plan.tasks.push_back(part);
  }
  plan.partial_floats += splits * group_of_splits.slot_floats;
  plan.split_groups.push_back(group_of_splits);
}

Plan plan_tasks(const int32_t* seq_lens, const int32_t* query_start_loc, int64_t num_seqs, int64_t num_kv_heads,
                int64_t group, int64_t padded_dim, int64_t sliding_window, int64_t threads) {
  Plan plan;
  int64_t decode_seqs = 0, other_tasks = 0;
  const int64_t chunk = queries_per_task(group);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
    if (q_len == 0) continue;
    if (decode_like(q_len, group)) {
      ++decode_seqs;
    } else {
      other_tasks += (q_len + chunk - 1) / chunk * num_kv_heads;
      plan.prefill_like = true;
    }
  }
  // Split decodes by kv head (independent parts, nothing to merge, the same arithmetic) only while
  // there are too few tasks to go round the threads.
  const int64_t wanted_tasks = threads * kTasksPerThread;
  const int64_t head_splits_wanted =
      decode_seqs > 0 && decode_seqs + other_tasks < wanted_tasks
          ? (wanted_tasks - other_tasks + decode_seqs - 1) / decode_seqs
          : 1;

  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
    if (q_len == 0) continue;
    if (!decode_like(q_len, group)) {
      for (int64_t i0 = 0; i0 < q_len; i0 += chunk) {
        const int64_t n = std::min(chunk, q_len - i0);
        const int64_t first_pos = query_position(seq_lens[b], q_len, i0);
        const int64_t key_begin = first_visible_key(first_pos, sliding_window), key_end = first_pos + n;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          plan.tasks.push_back({.seq = b,
                                .kv_head_begin = h,
                                .num_kv_heads = 1,
                                .first_query = i0,
                                .num_queries = n,
                                .key_begin = key_begin,
                                .key_end = key_end,
                                .partial = -1,
                                .cost = n * group * (key_end - key_begin),
                                .prefill = true});
        }
        plan.max_rows = std::max(plan.max_rows, n * group);
      }
      continue;
    }
    const int64_t head_splits = std::min(head_splits_wanted, num_kv_heads);
    const int64_t first_pos = query_position(seq_lens[b], q_len, 0);
    for (int64_t hs = 0; hs < head_splits; ++hs) {
      const int64_t head_begin = num_kv_heads * hs / head_splits, head_end = num_kv_heads * (hs + 1) / head_splits;
      const Task whole{.seq = b,
                       .kv_head_begin = head_begin,
                       .num_kv_heads = head_end - head_begin,
                       .first_query = 0,
                       .num_queries = q_len,
                       .key_begin = first_visible_key(first_pos, sliding_window),
                       .key_end = seq_lens[b],
                       .partial = -1,
                       .cost = 0,
                       .prefill = false};
      add_decode_task(plan, whole, group, padded_dim);
    }
  }
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return plan;
}

}  // namespace

void paged_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  check_paged_attention_args(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  check_attention_metadata(block_tables, seq_lens, query_start_loc, q.size(0), num_blocks, block_size,
                           sliding_window);
  if (head_dim == 0) return;
  const int64_t group = q.size(1) / num_kv_heads, padded_dim = cpu::round_up_to_lanes(head_dim);
  const int64_t threads = at::get_num_threads();
  const Plan plan = plan_tasks(seq_lens.const_data_ptr<int32_t>(), query_start_loc.const_data_ptr<int32_t>(),
                               seq_lens.numel(), num_kv_heads, group, padded_dim, sliding_window, threads);
  if (plan.tasks.empty()) return;
  std::vector<float> partials(plan.partial_floats);
  MG_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention_cpu", [&] {
    const Problem<scalar_t> problem{
        .out = out.mutable_data_ptr<scalar_t>(),
        .q = q.const_data_ptr<scalar_t>(),
        .k_cache = k_cache.const_data_ptr<scalar_t>(),
        .v_cache = v_cache.const_data_ptr<scalar_t>(),
        .block_tables = block_tables.const_data_ptr<int32_t>(),
        .seq_lens = seq_lens.const_data_ptr<int32_t>(),
        .query_start_loc = query_start_loc.const_data_ptr<int32_t>(),
        .out_token_stride = out.stride(0),
        .q_token_stride = q.stride(0),
        .num_kv_heads = num_kv_heads,
        .group = group,
        .head_dim = head_dim,
        .padded_dim = padded_dim,
        .block_size = block_size,
        .max_blocks = block_tables.size(1),
        .scale_log2 = static_cast<float>(scale) * kLog2e,
        .sliding_window = sliding_window,
        .amx_prefill = std::is_same_v<scalar_t, c10::BFloat16> && head_dim % attention_amx::kDimBlock == 0 &&
                       attention_amx::usable()};
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(threads, static_cast<int64_t>(plan.tasks.size()));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { run_tasks(problem, plan, next, partials.data()); });
    at::parallel_for(0, static_cast<int64_t>(plan.split_groups.size()), 1, [&](int64_t begin, int64_t end) {
      merge_split_groups(problem, plan, begin, end, partials.data());
    });
  });
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace mistral_grpc
