// Host-timed breakdown of where a step's time goes, by kind of work: every op
// of ops.h called on a synchronous stream (the CPU default stream runs the
// kernel inside the call) and host regions the model marks (the router's
// softmax and top-k, the dispatcher's index building) are charged to a
// category. Time is exclusive: an op inside a region is charged to the op's
// category, the rest of the region to the region's. Ops enqueued on
// asynchronous streams (worker streams, CUDA) are not timed here: their host
// call measures nothing; device-side figures come from events.
//
//   OpProfiler::Enable(true);
//   ... a training step ...
//   OpProfile p = OpProfiler::Take();   // totals since the last Take(), then reset
//   p.seconds[static_cast<int>(ProfileCategory::kGemm)]
//
// Disabled (the default), a timed op costs one relaxed atomic load.
#ifndef MOE_RUNTIME_CORE_OP_PROFILE_H_
#define MOE_RUNTIME_CORE_OP_PROFILE_H_

#include <cstdint>
#include <string>

#include "runtime/core/backend.h"

namespace moe {

enum class ProfileCategory : uint8_t {
  kGemm = 0,     // Gemm, BatchedGemm, GroupedGemm(+WeightGrad): every matrix product, router's too
  kAttention,    // CausalAttention(+Backward), Rope(+Backward)
  kNorm,         // RmsNorm(+Backward), AddRmsNorm
  kRouter,       // Softmax(+Backward), TopK; router host work (softmax, top-k, capacity, losses)
  kPermute,      // GatherRows, ScatterAddRows, GatherRowDot; dispatcher index building
  kElementwise,  // Add, Axpby, Mul, Scale, Silu, SwiGLU(+Backward), Copy, Cast, Fill, reductions
  kLoss,         // CrossEntropy(+Backward), LogSumExp
  kOptimizer,    // AdamW
  kInit,         // InitNormal
  kNumCategories
};
const char* ProfileCategoryName(ProfileCategory c);
ProfileCategory CategoryOfOp(OpKind op);

inline constexpr int kNumProfileCategories = static_cast<int>(ProfileCategory::kNumCategories);

struct OpProfile {
  double seconds[kNumProfileCategories] = {};
  int64_t calls[kNumProfileCategories] = {};
  double total_seconds() const;
  // One line per category with calls: "gemm 41.2 ms (52.1%, 96 calls)"; percentages of
  // `wall_seconds` when > 0 (plus an "other" line for the untimed rest), else of the total.
  std::string Report(double wall_seconds = 0) const;
};

class OpProfiler {
 public:
  static void Enable(bool on);
  static bool enabled();
  // Totals since the last Take() (all threads), then resets them.
  static OpProfile Take();
};

// Charges the time between construction and destruction (less nested scopes)
// to `category` when profiling is enabled. Scopes nest per thread.
class ProfileScope {
 public:
  explicit ProfileScope(ProfileCategory category);
  // An op's scope: timed only on a synchronous (inline) stream.
  ProfileScope(const Stream& stream, OpKind op);
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  void Push(ProfileCategory category);
  bool active_ = false;
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_OP_PROFILE_H_
