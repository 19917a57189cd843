#include "runtime/core/op_profile.h"

#include <atomic>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moe {
namespace {

std::atomic<bool> g_enabled{false};
std::atomic<int64_t> g_nanos[kNumProfileCategories];
std::atomic<int64_t> g_calls[kNumProfileCategories];

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// This thread's open scopes: category and the time its current segment began.
struct Open {
  ProfileCategory category;
  int64_t since;
};
thread_local std::vector<Open> tls_open;

void Charge(ProfileCategory c, int64_t nanos) {
  g_nanos[static_cast<int>(c)].fetch_add(nanos, std::memory_order_relaxed);
}

}  // namespace

const char* ProfileCategoryName(ProfileCategory c) {
  static const char* const kNames[] = {"gemm",        "attention", "norm",      "router", "permute",
                                       "elementwise", "loss",      "optimizer", "init"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == kNumProfileCategories);
  const int i = static_cast<int>(c);
  return i < kNumProfileCategories ? kNames[i] : "?";
}

ProfileCategory CategoryOfOp(OpKind op) {
  switch (op) {
    case OpKind::kGemm:
    case OpKind::kBatchedGemm:
    case OpKind::kGroupedGemm:
    case OpKind::kGroupedGemmWeightGrad:
      return ProfileCategory::kGemm;
    case OpKind::kRope:
    case OpKind::kRopeBackward:
    case OpKind::kCausalAttention:
    case OpKind::kCausalAttentionBackward:
      return ProfileCategory::kAttention;
    case OpKind::kRmsNorm:
    case OpKind::kRmsNormBackward:
    case OpKind::kAddRmsNorm:
      return ProfileCategory::kNorm;
    case OpKind::kSoftmax:
    case OpKind::kSoftmaxBackward:
    case OpKind::kTopK:
      return ProfileCategory::kRouter;
    case OpKind::kGatherRows:
    case OpKind::kScatterAddRows:
    case OpKind::kGatherRowDot:
      return ProfileCategory::kPermute;
    case OpKind::kLogSumExp:
    case OpKind::kCrossEntropy:
    case OpKind::kCrossEntropyBackward:
      return ProfileCategory::kLoss;
    case OpKind::kAdamW:
      return ProfileCategory::kOptimizer;
    case OpKind::kInitNormal:
      return ProfileCategory::kInit;
    default:
      return ProfileCategory::kElementwise;
  }
}

double OpProfile::total_seconds() const {
  double t = 0;
  for (double s : seconds) t += s;
  return t;
}

std::string OpProfile::Report(double wall_seconds) const {
  const double total = total_seconds();
  const double base = wall_seconds > 0 ? wall_seconds : total;
  std::string out;
  for (int c = 0; c < kNumProfileCategories; ++c) {
    if (calls[c] == 0 && seconds[c] == 0) continue;
    absl::StrAppendFormat(&out, "  %-12s %9.2f ms  %5.1f%%  %6d calls\n",
                          ProfileCategoryName(static_cast<ProfileCategory>(c)), 1e3 * seconds[c],
                          base > 0 ? 100.0 * seconds[c] / base : 0.0, calls[c]);
  }
  if (wall_seconds > 0) {
    absl::StrAppendFormat(&out, "  %-12s %9.2f ms  %5.1f%%  (host code outside ops and regions)\n", "other",
                          1e3 * (wall_seconds - total), 100.0 * (wall_seconds - total) / wall_seconds);
  }
  return out;
}

void OpProfiler::Enable(bool on) { g_enabled.store(on, std::memory_order_relaxed); }
bool OpProfiler::enabled() { return g_enabled.load(std::memory_order_relaxed); }

OpProfile OpProfiler::Take() {
  OpProfile p;
  for (int c = 0; c < kNumProfileCategories; ++c) {
    p.seconds[c] = 1e-9 * static_cast<double>(g_nanos[c].exchange(0));
    p.calls[c] = g_calls[c].exchange(0);
  }
  return p;
}

ProfileScope::ProfileScope(ProfileCategory category) {
  if (OpProfiler::enabled()) Push(category);
}

ProfileScope::ProfileScope(const Stream& stream, OpKind op) {
  if (OpProfiler::enabled() && stream.mode() == StreamMode::kInline) Push(CategoryOfOp(op));
}

void ProfileScope::Push(ProfileCategory category) {
  const int64_t now = NowNanos();
  if (!tls_open.empty()) Charge(tls_open.back().category, now - tls_open.back().since);
  tls_open.push_back({category, now});
  g_calls[static_cast<int>(category)].fetch_add(1, std::memory_order_relaxed);
  active_ = true;
}

ProfileScope::~ProfileScope() {
  if (!active_) return;
  const int64_t now = NowNanos();
  Charge(tls_open.back().category, now - tls_open.back().since);
  tls_open.pop_back();
  if (!tls_open.empty()) tls_open.back().since = now;
}

}  // namespace moe
