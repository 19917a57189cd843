#include "runtime/core/memory.h"

#include "absl/strings/str_format.h"

namespace moe {

const char* MemoryCategoryName(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::kParameters:
      return "parameters";
    case MemoryCategory::kGradients:
      return "gradients";
    case MemoryCategory::kOptimizer:
      return "optimizer";
    case MemoryCategory::kActivations:
      return "activations";
    case MemoryCategory::kCommunication:
      return "communication";
    case MemoryCategory::kOther:
      return "other";
  }
  return "?";
}

void MemoryTracker::RaisePeak(std::atomic<int64_t>& peak, int64_t value) {
  int64_t old = peak.load(std::memory_order_relaxed);
  while (value > old && !peak.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
}

void MemoryTracker::OnAllocate(MemoryCategory c, int64_t bytes) {
  int i = static_cast<int>(c);
  count_[i].fetch_add(1, std::memory_order_relaxed);
  RaisePeak(peak_[i], live_[i].fetch_add(bytes, std::memory_order_relaxed) + bytes);
  RaisePeak(total_peak_, total_live_.fetch_add(bytes, std::memory_order_relaxed) + bytes);
}

void MemoryTracker::OnFree(MemoryCategory c, int64_t bytes) {
  live_[static_cast<int>(c)].fetch_sub(bytes, std::memory_order_relaxed);
  total_live_.fetch_sub(bytes, std::memory_order_relaxed);
}

MemoryStats MemoryTracker::Stats(MemoryCategory c) const {
  int i = static_cast<int>(c);
  return {live_[i].load(), peak_[i].load(), count_[i].load()};
}

MemoryStats MemoryTracker::Total() const {
  int64_t n = 0;
  for (const auto& c : count_) n += c.load();
  return {total_live_.load(), total_peak_.load(), n};
}

void MemoryTracker::ResetPeak() {
  for (int i = 0; i < kNumMemoryCategories; ++i) peak_[i].store(live_[i].load());
  total_peak_.store(total_live_.load());
}

std::string MemoryTracker::Report() const {
  std::string out;
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1 << 20); };
  for (int i = 0; i < kNumMemoryCategories; ++i) {
    MemoryStats s = Stats(static_cast<MemoryCategory>(i));
    absl::StrAppendFormat(&out, "%-13s live %10.3f MiB  peak %10.3f MiB\n",
                          MemoryCategoryName(static_cast<MemoryCategory>(i)), mib(s.live_bytes),
                          mib(s.peak_bytes));
  }
  MemoryStats t = Total();
  absl::StrAppendFormat(&out, "%-13s live %10.3f MiB  peak %10.3f MiB", "total", mib(t.live_bytes),
                        mib(t.peak_bytes));
  return out;
}

}  // namespace moe
