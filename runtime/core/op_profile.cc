#include "runtime/core/op_profile.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
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

// Stream-timed ops waiting for Take(): category and the events around the op.
struct Pending {
  ProfileCategory category;
  std::unique_ptr<Event> start, end;
};
// Bounded so that profiling left on without Take() cannot grow without end.
constexpr size_t kMaxPending = size_t{1} << 20;
std::mutex g_pending_mu;
std::vector<Pending>* g_pending = new std::vector<Pending>();  // leaked: used at exit
std::atomic<int64_t> g_dropped{0};

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
    case OpKind::kRouterScores:
    case OpKind::kRouterScoresBackward:
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

double OpProfile::total_stream_seconds() const {
  double t = 0;
  for (double s : stream_seconds) t += s;
  return t;
}

void OpProfile::DivideBy(int64_t n) {
  if (n <= 1) return;
  for (int c = 0; c < kNumProfileCategories; ++c) {
    seconds[c] /= static_cast<double>(n);
    stream_seconds[c] /= static_cast<double>(n);
    calls[c] /= n;
    stream_calls[c] /= n;
  }
  stream_dropped /= n;
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
  if (wall_seconds > 0 && total > 0) {
    absl::StrAppendFormat(&out, "  %-12s %9.2f ms  %5.1f%%  (host code outside ops and regions)\n", "other",
                          1e3 * (wall_seconds - total), 100.0 * (wall_seconds - total) / wall_seconds);
  }
  const double stream_total = total_stream_seconds();
  bool any_stream = stream_dropped > 0;
  for (int c = 0; c < kNumProfileCategories; ++c) any_stream = any_stream || stream_calls[c] > 0;
  if (!any_stream) return out;
  const double sbase = wall_seconds > 0 ? wall_seconds : stream_total;
  absl::StrAppend(&out, "  ops on asynchronous streams (time between events around each op):\n");
  for (int c = 0; c < kNumProfileCategories; ++c) {
    if (stream_calls[c] == 0) continue;
    absl::StrAppendFormat(&out, "  %-12s %9.2f ms  %5.1f%%  %6d calls\n",
                          ProfileCategoryName(static_cast<ProfileCategory>(c)), 1e3 * stream_seconds[c],
                          sbase > 0 ? 100.0 * stream_seconds[c] / sbase : 0.0, stream_calls[c]);
  }
  if (wall_seconds > 0) {
    absl::StrAppendFormat(&out, "  %-12s %9.2f ms  %5.1f%%  (streams idle or between ops)\n", "other",
                          1e3 * (wall_seconds - stream_total),
                          100.0 * (wall_seconds - stream_total) / wall_seconds);
  }
  if (stream_dropped > 0)
    absl::StrAppendFormat(&out, "  (%d ops not timed: their events failed)\n", stream_dropped);
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
  std::vector<Pending> pending;
  {
    std::lock_guard<std::mutex> lock(g_pending_mu);
    pending.swap(*g_pending);
  }
  p.stream_dropped = g_dropped.exchange(0);
  for (Pending& op : pending) {
    absl::StatusOr<double> ms = op.end->Synchronize().ok() ? op.end->ElapsedMsSince(*op.start)
                                                           : absl::StatusOr<double>(absl::UnknownError(""));
    if (!ms.ok() || *ms < 0) {
      ++p.stream_dropped;
      continue;
    }
    const int c = static_cast<int>(op.category);
    p.stream_seconds[c] += 1e-3 * *ms;
    ++p.stream_calls[c];
  }
  return p;
}

ProfileScope::ProfileScope(ProfileCategory category) {
  if (OpProfiler::enabled()) Push(category);
}

ProfileScope::ProfileScope(Stream& stream, OpKind op) {
  if (!OpProfiler::enabled()) return;
  if (stream.mode() == StreamMode::kInline) {
    Push(CategoryOfOp(op));
    return;
  }
  absl::StatusOr<std::unique_ptr<Event>> start = stream.backend().CreateEvent();
  if (!start.ok() || !stream.Record(**start).ok()) {
    g_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  stream_ = &stream;
  start_ = std::move(*start);
  category_ = CategoryOfOp(op);
}

void ProfileScope::Push(ProfileCategory category) {
  const int64_t now = NowNanos();
  if (!tls_open.empty()) Charge(tls_open.back().category, now - tls_open.back().since);
  tls_open.push_back({category, now});
  g_calls[static_cast<int>(category)].fetch_add(1, std::memory_order_relaxed);
  active_ = true;
}

ProfileScope::~ProfileScope() {
  if (stream_ != nullptr) {
    absl::StatusOr<std::unique_ptr<Event>> end = stream_->backend().CreateEvent();
    if (!end.ok() || !stream_->Record(**end).ok()) {
      g_dropped.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    std::lock_guard<std::mutex> lock(g_pending_mu);
    if (g_pending->size() >= kMaxPending) {
      g_dropped.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    g_pending->push_back({category_, std::move(start_), std::move(*end)});
    return;
  }
  if (!active_) return;
  const int64_t now = NowNanos();
  Charge(tls_open.back().category, now - tls_open.back().since);
  tls_open.pop_back();
  if (!tls_open.empty()) tls_open.back().since = now;
}

}  // namespace moe
