// moe-bench expert-ffn: the SwiGLU expert FFN, forward + backward, through
// model::GroupedExperts (the grouped GEMM path the MoE layer runs), against one
// large sgemm of the same total FLOPs run in the same process.
//
//   build/bin/moe-bench expert-ffn [experts=8] [top_k=2] [hidden=512]
//       [expert_ffn=1024] [tokens=4096] [skew=0.4] [iters=3] [--json]
//
// Rows are already permuted into expert order (R = tokens * top_k rows); only
// the per-expert row counts matter to the FFN. "balanced": R / E rows each;
// "skewed": expert 0 gets skew * R rows, the others share the rest evenly.
// One iteration:
//   forward   gate = x Wg_e^T, up = x Wu_e^T, act = silu(gate) * up, y = act Wd_e^T
//   backward  dact = dy Wd_e, dWd_e += dy^T act, SwiGLU backward -> dgate, dup,
//             dx = dgate Wg_e + dup Wu_e, dWg_e += dgate^T x, dWu_e += dup^T x
// i.e. 9 GEMMs of 2 * R * hidden * expert_ffn FLOPs each (element-wise work is
// timed but not counted). The reference is ops::Gemm (one cblas_sgemm call in
// the CPU backend) with exactly the same FLOPs: M = 9 * hidden, N = R / 2,
// K = 2 * expert_ffn.
// Ratio vs_sgemm = sgemm time / expert FFN time (1.0 = as fast as one big GEMM).
// Times are medians of `iters` alternating (sgemm, FFN) rounds after a warm-up; threads:
// the CPU backend's (OPENBLAS_NUM_THREADS, default all cores).
#include <algorithm>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/bench/bench.h"
#include "model/experts.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

template <typename Fn>
absl::StatusOr<double> Seconds(Fn fn) {
  auto start = Clock::now();
  RETURN_IF_ERROR(fn());
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double Median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Inputs of the FFN and the experts (their activations and grads are the
// layer's own, allocated by Forward/Backward as in training).
struct Ffn {
  Tensor x, dy;
  model::GroupedExperts experts;
};

absl::Status MakeFfn(Backend& cpu, Stream& s, int64_t E, int64_t R, int64_t d, int64_t f, Ffn& n) {
  ASSIGN_OR_RETURN(n.x, Tensor::Empty(cpu, {R, d}, DType::kF32, MemoryCategory::kActivations));
  ASSIGN_OR_RETURN(n.dy, Tensor::Empty(cpu, {R, d}, DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::InitNormal(s, n.x, 1, "bench.x", 1.0f));
  RETURN_IF_ERROR(ops::InitNormal(s, n.dy, 1, "bench.dy", 1.0f));
  return n.experts.Init(s, "bench.experts.", d, f, E, 0, E, 0.02f, 0.02f, 1);
}

absl::Status FfnStep(Stream& s, Ffn& n, const std::vector<int64_t>& off) {
  ASSIGN_OR_RETURN(Tensor y, n.experts.Forward(s, n.x, off));
  ASSIGN_OR_RETURN(Tensor dx, n.experts.Backward(s, n.dy));
  return s.Synchronize();
}

absl::Status RunExpertFfn(const Args& args, Reporter& reporter) {
  const int64_t E = args.Int("experts", 8), k = args.Int("top_k", 2), d = args.Int("hidden", 512),
                f = args.Int("expert_ffn", 1024), tokens = args.Int("tokens", 4096);
  const double skew = args.Double("skew", 0.4);
  const int iters = static_cast<int>(args.Int("iters", 3));
  const int64_t R = tokens * k;
  if (E < 2 || k < 1 || k > E || d < 1 || f < 1 || tokens < 1 || R % 2 != 0 || iters < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("expert-ffn: need experts >= 2, 1 <= top_k <= experts, hidden, expert_ffn, tokens, iters"
                     " >= 1 and tokens * top_k even; got experts=",
                     E, " top_k=", k, " tokens=", tokens));
  if (skew <= 0 || skew > 1)
    return absl::InvalidArgumentError(absl::StrCat("expert-ffn: skew = ", skew, " must be in (0, 1]"));
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  Stream& s = cpu->default_stream();
  const double flops = 9.0 * 2.0 * R * d * f;

  // The reference: one sgemm with the same FLOPs.
  const int64_t M = 9 * d, N = R / 2, K = 2 * f;
  ASSIGN_OR_RETURN(Tensor a, Tensor::Empty(*cpu, {M, K}, DType::kF32, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor b, Tensor::Empty(*cpu, {K, N}, DType::kF32, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor c, Tensor::Empty(*cpu, {M, N}, DType::kF32, MemoryCategory::kOther));
  RETURN_IF_ERROR(ops::InitNormal(s, a, 1, "bench.a", 1.0f));
  RETURN_IF_ERROR(ops::InitNormal(s, b, 1, "bench.b", 1.0f));
  auto sgemm = [&] {
    RETURN_IF_ERROR(ops::Gemm(s, a, false, b, false, c));
    return s.Synchronize();
  };

  Ffn ffn;
  RETURN_IF_ERROR(MakeFfn(*cpu, s, E, R, d, f, ffn));
  for (const char* routing : {"balanced", "skewed"}) {
    std::vector<int64_t> counts(E);
    if (std::string(routing) == "balanced") {
      for (int64_t e = 0; e < E; ++e) counts[e] = R / E + (e < R % E ? 1 : 0);
    } else {
      counts[0] = static_cast<int64_t>(skew * R);
      int64_t rest = R - counts[0];
      for (int64_t e = 1; e < E; ++e) counts[e] = rest / (E - 1) + (e - 1 < rest % (E - 1) ? 1 : 0);
    }
    std::vector<int64_t> off(1, 0);
    for (int64_t c : counts) off.push_back(off.back() + c);
    // Alternate the two so that load from other processes hits both alike.
    RETURN_IF_ERROR(sgemm());
    RETURN_IF_ERROR(FfnStep(s, ffn, off));
    std::vector<double> t_sgemm, t_ffn;
    for (int i = 0; i < iters; ++i) {
      ASSIGN_OR_RETURN(double ts, Seconds(sgemm));
      ASSIGN_OR_RETURN(double tf, Seconds([&] { return FfnStep(s, ffn, off); }));
      t_sgemm.push_back(ts);
      t_ffn.push_back(tf);
    }
    const double sgemm_s = Median(t_sgemm), ffn_s = Median(t_ffn);
    const int64_t max_rows = *std::max_element(counts.begin(), counts.end());
    reporter.Add({{{"routing", routing},
                   {"experts", absl::StrCat(E)},
                   {"top_k", absl::StrCat(k)},
                   {"hidden", absl::StrCat(d)},
                   {"expert_ffn", absl::StrCat(f)},
                   {"tokens", absl::StrCat(tokens)},
                   {"max_rows", absl::StrCat(max_rows)},
                   {"threads", absl::StrCat(cpu->num_threads())}},
                  {{"ffn_time", ffn_s * 1e3, "ms"},
                   {"ffn_gflops", flops / ffn_s * 1e-9, "GFLOP/s"},
                   {"sgemm_gflops", flops / sgemm_s * 1e-9, "GFLOP/s"}},
                  "vs_sgemm",
                  sgemm_s / ffn_s});
  }
  reporter.Note(
      absl::StrFormat("expert FFN fwd+bwd = 9 grouped GEMMs (%.1f GFLOP) + SwiGLU; vs_sgemm = time of one "
                      "sgemm [%d x %d x %d] of equal FLOPs / expert FFN time (medians of %d alternating "
                      "rounds); target >= 0.70",
                      flops * 1e-9, 9 * d, R / 2, 2 * f, iters));
  return absl::OkStatus();
}

static Registrar reg("expert-ffn", "SwiGLU expert FFN fwd+bwd through the grouped GEMM vs one large sgemm",
                     RunExpertFfn);

}  // namespace
}  // namespace moe::bench
