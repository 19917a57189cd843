// Predicted peak memory of one rank for a job config, as a documented sum of
// terms (memory_model.cc lists each formula), to compare with the measured
// MemoryTracker peak of a training step.
#ifndef MOE_RUNTIME_CORE_MEMORY_MODEL_H_
#define MOE_RUNTIME_CORE_MEMORY_MODEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/core/config.h"
#include "runtime/core/memory.h"

namespace moe {

struct MemoryTerm {
  std::string name;  // "layer activations: attention lse [B,H,S]"
  MemoryCategory category;
  int64_t bytes = 0;
};

struct MemoryPrediction {
  std::vector<MemoryTerm> terms;
  // Sum of the terms per category, and the predicted peak of the total
  // (persistent state + activations kept at the end of forward + the largest
  // transient working set of backward).
  int64_t bytes[kNumMemoryCategories] = {};
  int64_t peak_bytes = 0;
  std::string Report() const;  // one line per term, then per category and the peak
};

// `config` must be resolved (ApplyDefaults). Uses model.*, train.micro_batch,
// parallel.tensor and parallel.expert (experts per rank = E / EP; dense
// weights / TP; expert weights / TP with parallel.expert_tensor_parallel,
// else replicated over TP), optim.type (AdamW: 2 states; SGD: 1 if momentum > 0),
// train.precision (bf16: compute copies, bf16 activations) and train.device
// (the CPU backend's bf16 staging).
// InvalidArgument when a size is non-positive or EP does not divide E.
absl::StatusOr<MemoryPrediction> PredictPeakMemory(const config::JobConfig& config);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_MEMORY_MODEL_H_
