// Memory accounting per device, by category.
//
// Every Buffer a backend allocates is attributed to one MemoryCategory; the
// device's MemoryTracker counts live bytes and the peak (high-water mark) of
// each category and of their sum. The peak is reset by ResetPeak() (e.g. after
// model construction, to measure one training step).
//
//   MemoryTracker& mem = backend->memory();
//   mem.ResetPeak();
//   ... one step ...
//   MOE_LOG(INFO) << mem.Report();   // live / peak per category
//
// PredictPeakMemory() (memory_model.h) predicts the same figures from a config.
#ifndef MOE_RUNTIME_CORE_MEMORY_H_
#define MOE_RUNTIME_CORE_MEMORY_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace moe {

enum class MemoryCategory : uint8_t {
  kParameters = 0,
  kGradients = 1,
  kOptimizer = 2,      // AdamW exp_avg, exp_avg_sq, SGD momentum
  kActivations = 3,    // everything kept for backward, and forward/backward scratch
  kCommunication = 4,  // send/receive buffers of communicators and dispatchers
  kOther = 5,
};
inline constexpr int kNumMemoryCategories = 6;
const char* MemoryCategoryName(MemoryCategory c);  // "parameters", ...

struct MemoryStats {
  int64_t live_bytes = 0;
  int64_t peak_bytes = 0;
  int64_t num_allocations = 0;  // since construction (not reset by ResetPeak)
};

// Thread-safe (allocations may happen on stream worker threads).
class MemoryTracker {
 public:
  MemoryTracker() = default;
  MemoryTracker(const MemoryTracker&) = delete;
  MemoryTracker& operator=(const MemoryTracker&) = delete;

  // Called by buffer types on allocation / release.
  void OnAllocate(MemoryCategory c, int64_t bytes);
  void OnFree(MemoryCategory c, int64_t bytes);

  MemoryStats Stats(MemoryCategory c) const;
  // Live bytes of all categories, and the peak of that sum (not the sum of peaks).
  MemoryStats Total() const;
  // Sets every peak (per category and total) to the current live bytes.
  void ResetPeak();
  // One line per category: "parameters live 1.2 MiB peak 1.2 MiB", then the total.
  std::string Report() const;

 private:
  static void RaisePeak(std::atomic<int64_t>& peak, int64_t value);
  std::array<std::atomic<int64_t>, kNumMemoryCategories> live_{};
  std::array<std::atomic<int64_t>, kNumMemoryCategories> peak_{};
  std::array<std::atomic<int64_t>, kNumMemoryCategories> count_{};
  std::atomic<int64_t> total_live_{0};
  std::atomic<int64_t> total_peak_{0};
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_MEMORY_H_
