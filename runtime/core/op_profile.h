// A breakdown of where a step's time goes, by kind of work.
//
// Host-timed: every op of ops.h called on a synchronous stream (the CPU
// default stream runs the kernel inside the call) and host regions the model
// marks (the router's softmax and top-k, the dispatcher's index building) are
// charged to a category. Time is exclusive: an op inside a region is charged
// to the op's category, the rest of the region to the region's.
//
// Stream-timed: an op enqueued on an asynchronous stream (every CUDA stream, a
// CPU worker stream) gets an event recorded on its stream before and after it;
// Take() waits for the events and charges the time between them to the op's
// category (stream_seconds). That is the time the stream spent from reaching
// the op to finishing it: the kernels, plus any wait for the host to enqueue
// the rest of the op (an op of many small launches pays its launches). The
// events are created per op while profiling is on, so this is for benchmarks,
// not production runs.
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
#include <memory>
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
  double seconds[kNumProfileCategories] = {};  // host-timed
  int64_t calls[kNumProfileCategories] = {};
  double stream_seconds[kNumProfileCategories] = {};  // stream-timed (events)
  int64_t stream_calls[kNumProfileCategories] = {};
  int64_t stream_dropped = 0;           // ops whose events could not be made, recorded or read
  double total_seconds() const;         // host-timed
  double total_stream_seconds() const;  // stream-timed
  // Scales every figure by 1 / n (per-step averages over n steps).
  void DivideBy(int64_t n);
  // One line per category with calls: "gemm 41.2 ms (52.1%, 96 calls)"; percentages of
  // `wall_seconds` when > 0 (plus an "other" line for the untimed rest), else of the total.
  // Stream-timed figures follow under their own heading, with their own "other" line.
  std::string Report(double wall_seconds = 0) const;
};

class OpProfiler {
 public:
  static void Enable(bool on);
  static bool enabled();
  // Totals since the last Take() (all threads), then resets them. Waits for the
  // stream-timed ops' events.
  static OpProfile Take();
};

// Charges the time between construction and destruction (less nested scopes)
// to `category` when profiling is enabled. Scopes nest per thread.
class ProfileScope {
 public:
  explicit ProfileScope(ProfileCategory category);
  // An op's scope: host-timed on a synchronous (inline) stream, stream-timed
  // (events) on an asynchronous one.
  ProfileScope(Stream& stream, OpKind op);
  ~ProfileScope();
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  void Push(ProfileCategory category);
  bool active_ = false;
  // Stream-timed: the op's stream and its start event (the end is recorded at destruction).
  Stream* stream_ = nullptr;
  std::unique_ptr<Event> start_;
  ProfileCategory category_ = ProfileCategory::kElementwise;
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_OP_PROFILE_H_
