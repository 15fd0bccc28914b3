// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), shared by
// the CPU and CUDA samplers so one (seed, offset) gives the same draw on either device. A counter-
// based generator keeps no state: a row's draw is a pure function of its key and counter, so it
// cannot depend on which other rows share the batch or in what order they run.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace mistral_grpc {

struct PhiloxBlock {
  uint32_t word[4];
};

MG_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

// Random123's round function and Weyl key schedule, 10 rounds (its recommended count); checked
// against Random123's known-answer vectors in tests/ops/test_sampling.py.
MG_HOST_DEVICE PhiloxBlock philox4x32_10(PhiloxBlock counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, counter.word[0], hi0, lo0);
    philox_mulhilo(kMul1, counter.word[2], hi1, lo1);
    counter = PhiloxBlock{.word = {hi1 ^ counter.word[1] ^ key0, lo1, hi0 ^ counter.word[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// The sampler's one uniform draw for a row: key = seed, counter = (offset, 0); the first output
// word's top 24 bits give a float in [0, 1) with every value exactly representable.
MG_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  const PhiloxBlock counter{.word = {static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u}};
  const PhiloxBlock out = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(out.word[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace mistral_grpc
