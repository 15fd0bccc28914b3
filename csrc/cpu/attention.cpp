// paged_attention on CPU: prefill, chunked prefill and decode in one flash-style kernel.
//
// Work is split into tasks of (sequence, kv head, a run of consecutive queries). A task scores the
// queries of every query head in that kv head's GQA group together, so each cached K/V row is read
// and widened to fp32 once per task, not once per query head. Keys go by in tiles of kKeyTile:
//   scores = Q K^T (in the log2 domain), masked only on tiles that cross a causal or window edge,
//   an online softmax update per query row (vectorised across rows),
//   acc = acc * rescale + P V,
// and each row is divided by its softmax sum at the end. Scores are computed two ways: few rows
// (decode) take a dot product per (row, key); many rows (prefill) take an outer-product kernel over
// Q transposed, 16 rows per vector lane set, which needs no horizontal sums.
//
// Threads pull tasks from a shared counter, longest first, so a batch mixing a long prefill with
// short decodes keeps every core busy to the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/attention.h"
#include "common/cache.h"
#include "common/dispatch.h"
#include "cpu/simd.h"
#include "ops.h"

namespace mistral_grpc {
namespace {

using cpu::kLanes;
using cpu::vfloat;

constexpr int64_t kKeyTile = 32;      // keys scored and accumulated per step
constexpr int64_t kTargetRows = 64;   // query rows (queries x group heads) a task aims for
constexpr int64_t kRowBlock = 4;      // query rows held in registers at once
constexpr int64_t kKeyBlock = 4;      // keys held in registers at once (outer-product scores)
constexpr int64_t kVectorBlock = 4;   // 16-lane vectors held in registers per row or key

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
};

// Queries [first_query, first_query + num_queries) of sequence `seq` (counted within that
// sequence's q rows), for every query head of kv head `kv_head`'s group.
struct Task {
  int64_t seq, kv_head, first_query, num_queries, cost;
};

// Per-thread working memory, sized for the largest task. Row-major buffers have padded_dim columns
// (head_dim rounded up to whole vectors, zero filled); `padded_rows` rounds rows up likewise.
struct Scratch {
  Scratch(int64_t max_rows, int64_t padded_dim)
      : padded_rows(cpu::round_up_to_lanes(max_rows)),
        queries(max_rows * padded_dim),
        queries_t(padded_dim * padded_rows),
        acc(max_rows * padded_dim),
        scores(kKeyTile * padded_rows),
        keys(kKeyTile * padded_dim),
        values(kKeyTile * padded_dim),
        row_max(padded_rows),
        row_sum(padded_rows),
        rescale(padded_rows) {}

  int64_t padded_rows;
  std::vector<float> queries;    // [rows, padded_dim], pre-scaled by scale * log2(e)
  std::vector<float> queries_t;  // [padded_dim, padded_rows], for the outer-product scores
  std::vector<float> acc;        // [rows, padded_dim], unnormalised output
  std::vector<float> scores;     // [kKeyTile, padded_rows]: scores, then probabilities
  std::vector<float> keys;       // [kKeyTile, padded_dim], widened cache rows
  std::vector<float> values;
  std::vector<float> row_max, row_sum, rescale;  // [padded_rows], online softmax state
};

// Calls f(std::integral_constant<int64_t, n>) for 1 <= n <= Max: runtime block sizes to templates.
template <int64_t Max, typename F>
MG_ALWAYS_INLINE void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_count<Max - 1>(n, f);
  }
  f(std::integral_constant<int64_t, Max>{});
}

// Points rows[j] at key/value kt rows for positions k0.. of the task's kv head: straight into the
// cache when it already is fp32 without padding, else widened into `staging`.
template <typename T>
MG_ALWAYS_INLINE void gather_rows(const Problem<T>& p, const T* cache, const int32_t* block_table, int64_t kv_head,
                                  int64_t k0, int64_t kt, float* staging, const float** rows) {
  for (int64_t j = 0; j < kt; ++j) {
    const T* src = cache + cache_offset(slot_of_position(block_table, k0 + j, p.block_size), kv_head, p.num_kv_heads,
                                        p.head_dim);
    if constexpr (std::is_same_v<T, float>) {
      if (p.head_dim == p.padded_dim) {
        rows[j] = src;
        continue;
      }
    }
    float* dst = staging + j * p.padded_dim;
    cpu::for_each_lane_step(p.head_dim, [&](int64_t d, int64_t n) { cpu::store(dst + d, cpu::load_n(src + d, n)); });
    rows[j] = dst;
  }
}

// scores[j, r] = q_r . k_j for R rows, one key at a time: decode's few rows.
template <int64_t R>
MG_ALWAYS_INLINE void score_rows(const float* queries, int64_t padded_dim, const float* const* keys, int64_t kt,
                                 float* scores, int64_t padded_rows) {
  for (int64_t j = 0; j < kt; ++j) {
    vfloat acc[R] = {};
    for (int64_t d = 0; d < padded_dim; d += kLanes) {
      const vfloat k = cpu::load(keys[j] + d);
      for (int64_t r = 0; r < R; ++r) acc[r] += cpu::load(queries + r * padded_dim + d) * k;
    }
    for (int64_t r = 0; r < R; ++r) scores[j * padded_rows + r] = cpu::reduce_sum(acc[r]);
  }
}

// scores[j, 16 rows x NV] for J keys as outer products of key elements with Q^T rows: prefill.
template <int64_t J, int64_t NV>
MG_ALWAYS_INLINE void score_keys(const float* queries_t, int64_t padded_rows, const float* const* keys,
                                 int64_t head_dim, float* scores) {
  vfloat acc[J][NV] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    vfloat q[NV];
    for (int64_t v = 0; v < NV; ++v) q[v] = cpu::load(queries_t + d * padded_rows + v * kLanes);
    for (int64_t j = 0; j < J; ++j) {
      const vfloat k = cpu::splat(keys[j][d]);
      for (int64_t v = 0; v < NV; ++v) acc[j][v] += k * q[v];
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t v = 0; v < NV; ++v) cpu::store(scores + j * padded_rows + v * kLanes, acc[j][v]);
  }
}

// acc[r, d0 : d0 + 16 NV] = acc * rescale[r] + sum_j probs[j, r] v_j for R rows.
template <int64_t R, int64_t NV>
MG_ALWAYS_INLINE void accumulate_values(float* acc_rows, int64_t padded_dim, const float* rescale,
                                        const float* probs, int64_t padded_rows, const float* const* values,
                                        int64_t kt, int64_t d0) {
  vfloat acc[R][NV];
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = cpu::load(acc_rows + r * padded_dim + d0 + v * kLanes) * rescale[r];
  }
  for (int64_t j = 0; j < kt; ++j) {
    vfloat val[NV];
    for (int64_t v = 0; v < NV; ++v) val[v] = cpu::load(values[j] + d0 + v * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const vfloat prob = cpu::splat(probs[j * padded_rows + r]);
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += prob * val[v];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t v = 0; v < NV; ++v) cpu::store(acc_rows + r * padded_dim + d0 + v * kLanes, acc[r][v]);
  }
}

// Turns a tile's scores into probabilities, vectorised across rows, and updates each row's
// running max and sum; leaves in s.rescale the factor each row's acc must be scaled by.
MG_ALWAYS_INLINE void softmax_tile(Scratch& s, int64_t kt) {
  for (int64_t r0 = 0; r0 < s.padded_rows; r0 += kLanes) {
    vfloat tile_max = cpu::splat(-INFINITY);
    for (int64_t j = 0; j < kt; ++j) tile_max = cpu::max(tile_max, cpu::load(&s.scores[j * s.padded_rows + r0]));
    vfloat running_max = cpu::load(&s.row_max[r0]), base;
    const vfloat rescale = online_softmax_update(running_max, tile_max, base, cpu::Exp2{});
    vfloat sum{};
    for (int64_t j = 0; j < kt; ++j) {
      float* score = &s.scores[j * s.padded_rows + r0];
      const vfloat prob = cpu::exp2(cpu::load(score) - base);
      cpu::store(score, prob);
      sum += prob;
    }
    cpu::store(&s.row_max[r0], running_max);
    cpu::store(&s.row_sum[r0], cpu::load(&s.row_sum[r0]) * rescale + sum);
    cpu::store(&s.rescale[r0], rescale);
  }
}

template <typename T>
MG_ALWAYS_INLINE void run_task(const Problem<T>& p, const Task& task, Scratch& s) {
  const int64_t group = p.group, head_dim = p.head_dim, padded_dim = p.padded_dim;
  const int64_t rows = task.num_queries * group, padded_rows = s.padded_rows;
  const int64_t seq_len = p.seq_lens[task.seq];
  const int64_t q_start = p.query_start_loc[task.seq], q_len = p.query_start_loc[task.seq + 1] - q_start;
  const int64_t first_pos = query_position(seq_len, q_len, task.first_query);
  const int64_t last_pos = first_pos + task.num_queries - 1;
  const int32_t* block_table = p.block_tables + task.seq * p.max_blocks;
  const bool outer_product = rows >= kLanes;

  // Row r is query first_query + r / group, head kv_head * group + r % group.
  auto token_row = [&](int64_t r) { return q_start + task.first_query + r / group; };
  auto head = [&](int64_t r) { return task.kv_head * group + r % group; };
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = p.q + token_row(r) * p.q_token_stride + head(r) * head_dim;
    float* dst = &s.queries[r * padded_dim];
    cpu::for_each_lane_step(head_dim, [&](int64_t d, int64_t n) {
      cpu::store(dst + d, cpu::load_n(src + d, n) * p.scale_log2);
    });
  }
  if (outer_product) {
    std::fill(s.queries_t.begin(), s.queries_t.end(), 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < head_dim; ++d) s.queries_t[d * padded_rows + r] = s.queries[r * padded_dim + d];
    }
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * padded_dim, 0.f);
  std::fill(s.scores.begin(), s.scores.end(), 0.f);  // lanes past `rows` stay 0: finite, never read
  std::fill(s.row_max.begin(), s.row_max.end(), -INFINITY);
  std::fill(s.row_sum.begin(), s.row_sum.end(), 0.f);

  const float* keys[kKeyTile];
  const float* values[kKeyTile];
  const int64_t key_begin = first_visible_key(first_pos, p.sliding_window), key_end = last_pos + 1;
  // Tiles wholly inside every row's visible range skip the mask.
  const int64_t unmasked_begin = first_visible_key(last_pos, p.sliding_window), unmasked_end = first_pos + 1;
  for (int64_t k0 = key_begin; k0 < key_end; k0 += kKeyTile) {
    const int64_t kt = std::min(kKeyTile, key_end - k0);
    gather_rows(p, p.k_cache, block_table, task.kv_head, k0, kt, s.keys.data(), keys);
    gather_rows(p, p.v_cache, block_table, task.kv_head, k0, kt, s.values.data(), values);

    if (outer_product) {
      for (int64_t j0 = 0; j0 < kt; j0 += kKeyBlock) {
        for (int64_t v0 = 0; v0 < padded_rows / kLanes; v0 += kVectorBlock) {
          with_count<kKeyBlock>(std::min(kKeyBlock, kt - j0), [&](auto nk) {
            with_count<kVectorBlock>(std::min(kVectorBlock, padded_rows / kLanes - v0), [&](auto nv) {
              score_keys<decltype(nk)::value, decltype(nv)::value>(&s.queries_t[v0 * kLanes], padded_rows, keys + j0, head_dim,
                                     &s.scores[j0 * padded_rows + v0 * kLanes]);
            });
          });
        }
      }
    } else {
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        with_count<kRowBlock>(std::min(kRowBlock, rows - r0), [&](auto nr) {
          score_rows<decltype(nr)::value>(&s.queries[r0 * padded_dim], padded_dim, keys, kt, &s.scores[r0], padded_rows);
        });
      }
    }
    if (k0 < unmasked_begin || k0 + kt > unmasked_end) {
      for (int64_t j = 0; j < kt; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          if (!key_visible(k0 + j, first_pos + r / group, p.sliding_window)) s.scores[j * padded_rows + r] = -INFINITY;
        }
      }
    }

    softmax_tile(s, kt);

    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
      for (int64_t v0 = 0; v0 < padded_dim / kLanes; v0 += kVectorBlock) {
        with_count<kRowBlock>(std::min(kRowBlock, rows - r0), [&](auto nr) {
          with_count<kVectorBlock>(std::min(kVectorBlock, padded_dim / kLanes - v0), [&](auto nv) {
            accumulate_values<decltype(nr)::value, decltype(nv)::value>(&s.acc[r0 * padded_dim], padded_dim, &s.rescale[r0], &s.scores[r0],
                                          padded_rows, values, kt, v0 * kLanes);
          });
        });
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    T* dst = p.out + token_row(r) * p.out_token_stride + head(r) * head_dim;
    const float inv_sum = s.row_sum[r] > 0.f ? 1.f / s.row_sum[r] : 0.f;
    const float* src = &s.acc[r * padded_dim];
    cpu::for_each_lane_step(head_dim, [&](int64_t d, int64_t n) { cpu::store_n(dst + d, cpu::load(src + d) * inv_sum, n); });
  }
}

template <typename T>
MG_CPU_CLONES void run_tasks(const Problem<T>& p, const std::vector<Task>& tasks, std::atomic<int64_t>& next,
                             int64_t max_rows) {
  Scratch scratch(max_rows, p.padded_dim);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) run_task(p, tasks[i], scratch);
}

// Queries per task: enough rows (queries x group) for the outer-product kernel to fill its vectors.
int64_t queries_per_task(int64_t group) { return std::max<int64_t>(1, kTargetRows / group); }

std::vector<Task> plan_tasks(const int32_t* seq_lens, const int32_t* query_start_loc, int64_t num_seqs,
                             int64_t num_kv_heads, int64_t group, int64_t sliding_window) {
  std::vector<Task> tasks;
  const int64_t chunk = queries_per_task(group);
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_len = query_start_loc[b + 1] - query_start_loc[b];
    for (int64_t i0 = 0; i0 < q_len; i0 += chunk) {
      const int64_t n = std::min(chunk, q_len - i0);
      const int64_t first_pos = query_position(seq_lens[b], q_len, i0);
      const int64_t keys = first_pos + n - first_visible_key(first_pos, sliding_window);
      for (int64_t h = 0; h < num_kv_heads; ++h) tasks.push_back({b, h, i0, n, n * keys});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

void paged_attention_cpu(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
  check_paged_attention_args(out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  check_attention_metadata(block_tables, seq_lens, query_start_loc, q.size(0), num_blocks, block_size,
                           sliding_window);
  const int64_t group = q.size(1) / num_kv_heads;
  const std::vector<Task> tasks =
      plan_tasks(seq_lens.const_data_ptr<int32_t>(), query_start_loc.const_data_ptr<int32_t>(), seq_lens.numel(),
                 num_kv_heads, group, sliding_window);
  if (tasks.empty() || head_dim == 0) return;
  const int64_t max_rows = queries_per_task(group) * group;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  MG_DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_attention_cpu", [&] {
    const Problem<scalar_t> problem{out.mutable_data_ptr<scalar_t>(),
                                    q.const_data_ptr<scalar_t>(),
                                    k_cache.const_data_ptr<scalar_t>(),
                                    v_cache.const_data_ptr<scalar_t>(),
                                    block_tables.const_data_ptr<int32_t>(),
                                    seq_lens.const_data_ptr<int32_t>(),
                                    query_start_loc.const_data_ptr<int32_t>(),
                                    out.stride(0),
                                    q.stride(0),
                                    num_kv_heads,
                                    group,
                                    head_dim,
                                    cpu::round_up_to_lanes(head_dim),
                                    block_size,
                                    block_tables.size(1),
                                    static_cast<float>(scale) * kLog2e,
                                    sliding_window};
    std::atomic<int64_t> next{0};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { run_tasks(problem, tasks, next, max_rows); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace mistral_grpc
