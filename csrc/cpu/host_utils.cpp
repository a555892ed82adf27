// The gradient-buffer cache of empty_output_like (host_utils.h).
#include "host_utils.h"

#include <cstdlib>
#include <deque>
#include <mutex>

namespace bmc_fast::cpu {

namespace {

constexpr int64_t kMinCachedBytes = int64_t{16} << 20;  // smaller buffers fault in cheaply
constexpr size_t kMaxEntries = 4;

int64_t cache_cap_bytes() {
  static const int64_t cap = [] {
    const char* v = std::getenv("BMC_FAST_BUFFER_CACHE_MB");
    return (v != nullptr ? std::atoll(v) : int64_t{512}) << 20;
  }();
  return cap;
}

std::mutex mu;
std::deque<at::Tensor> cache;  // most recently returned last

}  // namespace

at::Tensor empty_output_like(const at::Tensor& t) {
  const auto opts = t.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  const int64_t cap = cache_cap_bytes();
  if (nbytes < kMinCachedBytes || nbytes > cap || !t.device().is_cpu()) return at::empty(t.sizes(), opts);
  std::lock_guard<std::mutex> lock(mu);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    // use_count 1: only this cache holds the storage (the tensor we handed out, its views and
    // any .grad that kept it are gone), so nobody can see the buffer being rewritten.
    if (it->storage().use_count() == 1 && it->storage().nbytes() == static_cast<size_t>(nbytes) &&
        it->scalar_type() == t.scalar_type()) {
      at::Tensor hit = *it;
      cache.erase(it);
      cache.push_back(hit);
      return hit.view(t.sizes());
    }
  }
  at::Tensor fresh = at::empty(t.sizes(), opts);
  cache.push_back(fresh);
  int64_t total = 0;
  for (const auto& c : cache) total += static_cast<int64_t>(c.storage().nbytes());
  while (!cache.empty() && (cache.size() > kMaxEntries || total > cap)) {
    total -= static_cast<int64_t>(cache.front().storage().nbytes());
    cache.pop_front();  // the oldest; a tensor still in use lives on with its user
  }
  return fresh;
}

}  // namespace bmc_fast::cpu
