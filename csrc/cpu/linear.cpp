// CPU linear layers: the ops around the kernels of cpu/linear_<isa>.cpp. Packing (once, at load)
// turns an [N, K] weight into the tile stream of common/linear_pack.h; each call checks the
// operands against the packed header, picks the kernels for the CPU, the weight dtype and the
// batch (AMX for bf16 batches of kAmxMinRows and more and fp32 ones of kAmxFp32MinRows and more),
// or, given prompt_rows, for each side of the batch (prompt rows, decode rows) whatever its size,
// and splits the output tiles across torch's intra-op threads, so each thread streams one
// contiguous share of the weights.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "common/linear_kernels.h"
#include "cpu/linear_quant.h"
#include "cpu/ops_cpu.h"
#include "ops.h"

namespace mistral_grpc {

namespace {

using namespace linear;

// ---- which kernels run ----------------------------------------------------------------------

// Ordered: a CPU that has one level has every level below it. amx = avx512_bf16 for small
// batches, AMX for large bf16 ones.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512", "avx512_bf16", "amx"};

Isa detect_isa() {
#if MG_LINEAR_X86_KERNELS
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bf16")) {
    return amx_usable() ? Isa::kAmx : Isa::kAvx512Bf16;
  }
  if (avx512) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa best_isa() {
  static const Isa detected = detect_isa();
  return detected;
}

// The level in use: the best one, unless lowered by linear_cpu_isa (tests run every level).
std::atomic<Isa>& active_isa() {
  static std::atomic<Isa> active{best_isa()};
  return active;
}

}  // namespace

const KernelSet& linear::kernels_for(WeightDtype dtype) {
  const bool fp32 = dtype == WeightDtype::kFloat32;
  switch (active_isa().load(std::memory_order_relaxed)) {
#if MG_LINEAR_X86_KERNELS
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
      return fp32 ? kAvx512Fp32 : kAvx512Bf16Dot;
    case Isa::kAvx512:
      return fp32 ? kAvx512Fp32 : kAvx512Bf16;
    case Isa::kAvx2:
      return fp32 ? kAvx2Fp32 : kAvx2Bf16;
#endif
    default:
      return fp32 ? kPortableFp32 : kPortableBf16;
  }
}

namespace {

// The quantized kernels for the level in use: int8 dot products need AVX-512 VNNI (found beside
// AVX512_BF16) or AVX2's vpmaddubsw; the "avx512" level (AVX-512F only) runs the AVX2 set.
const QuantKernelSet& quant_kernels() {
  switch (active_isa().load(std::memory_order_relaxed)) {
#if MG_LINEAR_X86_KERNELS
    case Isa::kAmx:
    case Isa::kAvx512Bf16:
      if (__builtin_cpu_supports("avx512vnni")) return kQuantAvx512Vnni;
      return kQuantAvx2;
    case Isa::kAvx512:
    case Isa::kAvx2:
      return kQuantAvx2;
#endif
    default:
      return kQuantPortable;
  }
}

// Returns the level in use; a non-empty `isa` first selects that level ("best" = the detected one).
std::string linear_cpu_isa(std::string_view isa) {
  if (!isa.empty()) {
    Isa wanted = best_isa();
    if (isa != "best") {
      const auto* found = std::find(std::begin(kIsaNames), std::end(kIsaNames), isa);
      TORCH_CHECK(found != std::end(kIsaNames), "linear_cpu_isa: unknown ISA '", isa,
                  "' (portable, avx2, avx512, avx512_bf16, amx or best)");
      wanted = static_cast<Isa>(found - std::begin(kIsaNames));
    }
    TORCH_CHECK(wanted <= best_isa(), "linear_cpu_isa: this CPU (or build) does not support ", isa, "; best is ",
                kIsaNames[static_cast<int>(best_isa())]);
    active_isa().store(wanted);
  }
  return kIsaNames[static_cast<int>(active_isa().load())];
}

// ---- packing ---------------------------------------------------------------------------------

// The WeightDtype of a (checked) float32 or bfloat16 weight.
WeightDtype weight_dtype(const at::Tensor& w) {
  return w.scalar_type() == at::kFloat ? WeightDtype::kFloat32 : WeightDtype::kBFloat16;
}

// Moves a [rows, k] matrix between its row-major form and sub-tile `unit` of every packed tile
// (of `units` interleaved line by line: gate is unit 0 and up unit 1 of a gate_up pack), 16 lines
// (a 16 x 16 block of fp32) at a time, so each matrix row sees a whole cache line at once: fp32
// rows of K = 1024 lie 4 KiB apart, in one L1 set, and line-by-line writes thrash it. The pads
// are left alone: the packed tensor starts zeroed.
template <bool kPack, typename T>
void copy_tiles(T* packed, T* matrix, int64_t rows, int64_t k, int64_t units, int64_t unit) {
  constexpr int64_t kPerStep = kStepBytes / kTileRows / sizeof(T);  // 1 for fp32, 2 for bf16
  constexpr int64_t kLineElems = kStepBytes / sizeof(T);
  constexpr int64_t kBlockLines = 16;
  const int64_t steps = (k + kPerStep - 1) / kPerStep;
  at::parallel_for(0, tiles_for(rows), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t valid_rows = std::min(kTileRows, rows - t * kTileRows);
      for (int64_t s0 = 0; s0 < steps; s0 += kBlockLines) {
        const int64_t s1 = std::min(steps, s0 + kBlockLines);
        for (int64_t j = 0; j < valid_rows; ++j) {
          T* row = matrix + (t * kTileRows + j) * k;
          for (int64_t s = s0; s < s1; ++s) {
            T* lane = packed + ((t * steps + s) * units + unit) * kLineElems + j * kPerStep;
            for (int64_t p = 0; p < std::min(kPerStep, k - s * kPerStep); ++p) {
              if constexpr (kPack) {
                lane[p] = row[s * kPerStep + p];
              } else {
                row[s * kPerStep + p] = lane[p];
              }
            }
          }
        }
      }
    }
  });
}

template <bool kPack>
void copy_matrix(uint8_t* tiles, const at::Tensor& matrix, int64_t units, int64_t unit) {
  const int64_t rows = matrix.size(0), k = matrix.size(1);
  if (matrix.scalar_type() == at::kFloat) {
    copy_tiles<kPack>(reinterpret_cast<float*>(tiles), matrix.data_ptr<float>(), rows, k, units, unit);
  } else {
    copy_tiles<kPack>(reinterpret_cast<c10::BFloat16*>(tiles), matrix.data_ptr<c10::BFloat16>(), rows, k, units,
                      unit);
  }
}

at::Tensor new_packed(WeightDtype dtype, PackKind kind, int64_t n, int64_t k) {
  at::Tensor packed = zeroed_bytes(packed_bytes(dtype, kind, n, k));
  PackedHeader header{};
  header.magic = kPackedMagic;
  header.dtype = dtype;
  header.kind = kind;
  header.n = n;
  header.k = k;
  header.activation = dtype;
  std::memcpy(packed.data_ptr<uint8_t>(), &header, sizeof header);
  return packed;
}

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  check_pack_linear_weight_args(weight);
  const WeightDtype dtype = weight_dtype(weight);
  const at::Tensor w = weight.contiguous();
  at::Tensor packed = new_packed(dtype, PackKind::kLinear, w.size(0), w.size(1));
  copy_matrix<true>(packed.data_ptr<uint8_t>() + kHeaderBytes, w, 1, 0);
  return packed;
}

at::Tensor pack_gate_up_weight(const at::Tensor& gate, const at::Tensor& up) {
  check_pack_gate_up_weight_args(gate, up);
  const WeightDtype dtype = weight_dtype(gate);
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor packed = new_packed(dtype, PackKind::kGateUp, g.size(0), g.size(1));
  copy_matrix<true>(packed.data_ptr<uint8_t>() + kHeaderBytes, g, 2, 0);
  copy_matrix<true>(packed.data_ptr<uint8_t>() + kHeaderBytes, u, 2, 1);
  return packed;
}

at::Tensor unpack_linear_weight(const at::Tensor& packed) {
  const PackedHeader header = check_packed_weight("unpack_linear_weight", packed);
  if (is_quantized(header.dtype)) return dequantize_packed(header, packed);
  const bool gate_up = header.kind == PackKind::kGateUp;
  at::Tensor weight = at::empty({header.n * (gate_up ? 2 : 1), header.k},
                                at::TensorOptions().dtype(torch_dtype(header.dtype)));
  uint8_t* tiles = packed.data_ptr<uint8_t>() + kHeaderBytes;
  if (gate_up) {
    copy_matrix<false>(tiles, weight.narrow(0, 0, header.n), 2, 0);
    copy_matrix<false>(tiles, weight.narrow(0, header.n, header.n), 2, 1);
  } else {
    copy_matrix<false>(tiles, weight, 1, 0);
  }
  return weight;
}

// ---- the ops ---------------------------------------------------------------------------------

#if MG_LINEAR_X86_KERNELS
// Up to 6 rows the vector kernel streams the weights in one block of rows, as fast as AMX; from
// 7 it needs a second block and AMX pulls ahead. Both threads, weights cold, bf16 gate_up
// [2 x 3584, 1024] + down [1024, 3584], ms vector vs AMX: 6 rows 0.89 vs 1.04, 8: 1.04 vs 0.96,
// 10: 1.22 vs 0.98, and at 32 rows 3.3 vs 1.2.
constexpr int64_t kAmxMinRows = 7;

// fp32 batches go to AMX (kAmxFp32) from this many rows (prefill chunks; decode batches stay on
// the vector kernels). Below it the weight stream decides, and the vector kernel streams better
// (the crossover measured on a decode step's linear calls: docs/performance.md).
constexpr int64_t kAmxFp32MinRows = 80;

// The most bytes of x's parts one fp32 AMX call splits and reads at a time (run_tiles).
constexpr int64_t kFp32SegmentBytes = 3 << 20;

// x as the AMX kernels read it: whole blocks of `block` rows, the rows past T zero.
at::Tensor amx_rows(const at::Tensor& x, int64_t block) {
  const int64_t rows = x.size(0);
  const int64_t padded = (rows + block - 1) / block * block;
  if (padded == rows) return x;
  at::Tensor copy = at::zeros({padded, x.size(1)}, x.options());
  copy.narrow(0, 0, rows).copy_(x);
  return copy;
}
#endif

// The kernels that compute a set of rows. Each gives a row the same result in any batch of rows it
// runs (tests/ops/test_linear.py checks it), but the AMX and vector kernels differ in rounding.
enum class Kernels { kVector, kAmxBf16, kAmxFp32 };

Kernels amx_kernels(const PackedHeader& header) {
#if MG_LINEAR_X86_KERNELS
  if (header.k % kAmxKBlock == 0 && cpu_amx_selected()) {
    return header.dtype == WeightDtype::kFloat32 ? Kernels::kAmxFp32 : Kernels::kAmxBf16;
  }
#endif
  return Kernels::kVector;
}

// By the call's rows: the fastest kernels for that many.
Kernels kernels_for_rows(const PackedHeader& header, int64_t rows) {
#if MG_LINEAR_X86_KERNELS
  const int64_t min_rows = header.dtype == WeightDtype::kFloat32 ? kAmxFp32MinRows : kAmxMinRows;
  if (rows >= min_rows) return amx_kernels(header);
#endif
  return Kernels::kVector;
}

// Decode rows, whatever their number. fp32: the vector kernels, which stream the weights faster than
// fp32 AMX below ~80 rows. bf16: AMX where the CPU has it, as for a prompt: it costs batch-1 some speed
// but keeps many-stream decode on the tile unit, which the seed contract would otherwise hand back.
Kernels decode_kernels(const PackedHeader& header) {
  return header.dtype == WeightDtype::kBFloat16 ? amx_kernels(header) : Kernels::kVector;
}

void run_kernels(Kernels choice, const PackedHeader& header, at::Tensor out, const at::Tensor& x,
                 const at::Tensor& packed, PackKind kind);

// prompt_rows < 0: the kernels go by x's rows. Else rows [0, prompt_rows) (a prompt's) run on AMX
// where the CPU has it and the others (decode rows) on decode_kernels, so that a row's result depends
// on its values and its side only, never on what else is in the batch.
void run_tiles(const char* op, at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, PackKind kind,
               int64_t prompt_rows) {
  const PackedHeader header = check_packed_weight(op, packed);
  check_linear_args(op, out, x, header, kind, prompt_rows);
  const int64_t rows = x.size(0);
  if (is_quantized(header.dtype)) {
    // One kernel family whatever the rows: each row's result is already independent of the batch.
    run_quant(quant_kernels(), header, out, x, packed);
    return;
  }
  if (prompt_rows < 0) {
    run_kernels(kernels_for_rows(header, rows), header, out, x, packed, kind);
    return;
  }
  if (prompt_rows > 0) {
    run_kernels(amx_kernels(header), header, out.narrow(0, 0, prompt_rows), x.narrow(0, 0, prompt_rows), packed,
                kind);
  }
  if (prompt_rows < rows) {
    run_kernels(decode_kernels(header), header, out.narrow(0, prompt_rows, rows - prompt_rows),
                x.narrow(0, prompt_rows, rows - prompt_rows), packed, kind);
  }
}

#if MG_LINEAR_X86_KERNELS
// fp32 rows on AMX: x split into its three bf16 parts, then the tiles.
void run_amx_fp32(Problem problem, const PackedHeader& header, const at::Tensor& x, bool gate_up) {
  // x as its three bf16 parts, split by both threads into a buffer kept per calling thread (to
  // spare the allocation). Where the parts outgrow kFp32SegmentBytes and the sums of all rows
  // and outputs (the C carried between segments) do not, K goes in segments of about that many
  // bytes of parts, each split into the same, still cached, memory (gate_up's weights flush a
  // buffer of the whole K from the caches before down_proj reads it); a gate_up's sums would cost
  // more to carry than the segments save.
  // (The lambdas run on other threads, which have storage of their own: take the pointers here.)
  thread_local std::vector<uint16_t> storage;
  thread_local std::vector<float> carry_storage;
  const int64_t rows = x.size(0), padded = tiles_for(rows) * kTileRows;
  const int64_t tiles = tiles_for(header.n), tiles_per_item = amx_fp32_tiles_per_item(gate_up ? 2 : 1);
  const int64_t items = (tiles + tiles_per_item - 1) / tiles_per_item;
  const int64_t carry_floats = items * tiles_for(rows) * kAmxFp32CarryFloats;
  const int64_t chunk_k = kAmxFp32ChunkBlocks * kAmxKBlock;
  const auto parts_bytes = [&](int64_t k) { return fp32_parts_elems(rows, k) * int64_t{sizeof(uint16_t)}; };
  const bool segmented = parts_bytes(header.k) > kFp32SegmentBytes &&
                         carry_floats * int64_t{sizeof(float)} <= kFp32SegmentBytes;
  const int64_t segment_k =
      segmented ? std::max<int64_t>(1, kFp32SegmentBytes / parts_bytes(chunk_k)) * chunk_k : header.k;
  uint16_t* parts = line_aligned(storage, fp32_parts_elems(rows, std::min(segment_k, header.k)));
  problem.carry = segmented ? line_aligned(carry_storage, carry_floats) : nullptr;
  problem.x = parts;
  const float* x_data = x.data_ptr<float>();
  const TileRangeFn fn = gate_up ? kAmxFp32.silu_mul : kAmxFp32.linear;
  for (int64_t k0 = 0; k0 < header.k; k0 += segment_k) {
    const int64_t k1 = std::min(header.k, k0 + segment_k);
    at::parallel_for(0, padded, kTileRows, [&](int64_t begin, int64_t end) {
      split_fp32_rows(x_data + k0, x.stride(0), rows, k1 - k0, begin, end, parts);
    });
    problem.k_begin = k0;
    problem.k_end = k1;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      fn(problem, begin * tiles_per_item, std::min(tiles, end * tiles_per_item));
    });
  }
}

// bf16 rows on AMX.
void run_amx_bf16(Problem problem, const at::Tensor& x, bool gate_up) {
  // A small batch's tiles are as high as its rows; larger ones go in whole blocks of 32.
  const bool small = x.size(0) <= kAmxSmallRows;
  const at::Tensor rows = small ? x : amx_rows(x, kAmxRowBlock);
  problem.x = rows.data_ptr();
  problem.x_stride = rows.stride(0);
  const KernelSet& amx = small ? kAmxBf16Rows16 : kAmxBf16;
  const TileRangeFn fn = gate_up ? amx.silu_mul : amx.linear;
  // Whole items per thread: 4 tiles (small linear), else 2.
  const int64_t grain = small && !gate_up ? 4 : 2;
  at::parallel_for(0, tiles_for(problem.n), grain, [&](int64_t begin, int64_t end) { fn(problem, begin, end); });
}
#endif

// Rows on the vector kernels of the level in use, each thread streaming a contiguous share of the tiles.
void run_vector(const Problem& problem, const PackedHeader& header, PackKind kind) {
  const KernelSet& kernels = kernels_for(header.dtype);
  const TileRangeFn fn = kind == PackKind::kGateUp ? kernels.silu_mul : kernels.linear;
  const int64_t bytes_per_task = problem.steps * kStepBytes * units_per_tile(kind);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / bytes_per_task);
  at::parallel_for(0, tiles_for(header.n), grain, [&](int64_t begin, int64_t end) { fn(problem, begin, end); });
}

void run_kernels(Kernels choice, const PackedHeader& header, at::Tensor out, const at::Tensor& x,
                 const at::Tensor& packed, PackKind kind) {
  if (x.size(0) == 0) return;
  const Problem problem{.tiles = packed.data_ptr<uint8_t>() + kHeaderBytes,
                        .steps = steps_per_tile(header.dtype, header.k),
                        .k = header.k,
                        .x = x.data_ptr(),
                        .x_stride = x.stride(0),
                        .out = out.data_ptr(),
                        .out_stride = out.stride(0),
                        .rows = x.size(0),
                        .n = header.n};
  const bool gate_up = kind == PackKind::kGateUp;
#if MG_LINEAR_X86_KERNELS
  if (choice == Kernels::kAmxFp32) return run_amx_fp32(problem, header, x, gate_up);
  if (choice == Kernels::kAmxBf16) return run_amx_bf16(problem, x, gate_up);
#endif
  run_vector(problem, header, kind);
}

}  // namespace

bool cpu_amx_selected() { return active_isa().load(std::memory_order_relaxed) == Isa::kAmx; }

void linear_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_weight, int64_t prompt_rows) {
  run_tiles("linear", out, x, packed_weight, PackKind::kLinear, prompt_rows);
}

void linear_silu_mul_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed_gate_up,
                         int64_t prompt_rows) {
  run_tiles("linear_silu_mul", out, x, packed_gate_up, PackKind::kGateUp, prompt_rows);
}

TORCH_LIBRARY_IMPL(mistral_grpc, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("pack_gate_up_weight", &pack_gate_up_weight);
  m.impl("unpack_linear_weight", &unpack_linear_weight);
  m.impl("linear", &linear_cpu);
  m.impl("linear_silu_mul", &linear_silu_mul_cpu);
}

// No tensor arguments, so no backend to dispatch on.
TORCH_LIBRARY_IMPL(mistral_grpc, CompositeExplicitAutograd, m) {
  m.impl("linear_cpu_isa", [](c10::string_view isa) { return linear_cpu_isa(isa); });
}

}  // namespace mistral_grpc
