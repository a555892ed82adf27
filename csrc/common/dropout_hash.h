// The counter-based random numbers of bn_relu_dropout's dropout mask, shared by every backend
// (and reproduced in bmc_fast/reference.py with int64 tensor arithmetic).
//
// Element i of a call with seed s is kept when hash(s, i) >> 8 (24 uniform bits) >= threshold,
// threshold = round(p * 2^24). The hash is two rounds of a 32-bit xor-shift-multiply mixer
// (the "lowbias32" family of integer hashes) keyed by the two halves of the seed, so the mask
// needs no state, no generator and no storage: any thread, any kernel, any backend computes
// the same bit for the same (seed, i).
#pragma once

#include <cstdint>

#include "bmc_hd.h"

namespace bmc_fast {

BMC_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// 24 uniform bits for element `i` of a call seeded with `seed`.
BMC_HD uint32_t dropout_bits(uint64_t seed, uint64_t i) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(i >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  return mix32(mix32(lo ^ k0) ^ (hi + k1)) >> 8;
}

// The keep threshold of a drop probability p in [0, 1).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 16777216.0 + 0.5);
}

}  // namespace bmc_fast
