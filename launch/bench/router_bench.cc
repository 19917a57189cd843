// moe-bench router: the router of one MoE layer and micro-batch on the CPU
// backend, on one thread against the backend's pool, in one run.
//
//   build/bin/moe-bench router [tokens=8192] [experts=8] [top_k=2] [hidden=64]
//       [threads=0] [iters=20] [--json]
//
// The forward's per-token work (scores, lse, the choice) and the losses' sums
// are stream work (ops::RouterScores, model/router.h); the host then reads
// the choice and makes the plan (weights, counts, capacity) and the losses:
// route_ms, the part a GPU idles through beyond the read itself, per MoE
// layer and micro-batch (docs/design.md's benchmark shape: tokens=8192 at
// micro_batch 4 x seq 2048, 16 MoE layers). Forward (logits GEMM on the CPU at
// hidden=64: small; forward_ms includes route_ms), then Backward with unit
// combine-weight gradients; wall-clock medians of interleaved runs.
// threads=0: the CPU backend's default (OPENBLAS_NUM_THREADS, else every
// core). Ratio parallel_speedup = forward time on 1 thread / on the pool.
#include <algorithm>
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "model/router.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "runtime/core/config.pb.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "runtime/core/tensor.h"

namespace moe::bench {
namespace {

absl::Status RunRouter(const Args& args, Reporter& rep) {
  const int64_t T = args.Int("tokens", 8192), E = args.Int("experts", 8), k = args.Int("top_k", 2);
  const int64_t hidden = args.Int("hidden", 64), iters = args.Int("iters", 20);
  if (T <= 0 || E < 2 || k < 1 || k > E || hidden <= 0 || iters <= 0) {
    return absl::InvalidArgumentError(
        "router: needs tokens > 0, experts >= 2, 1 <= top_k <= experts, hidden > 0, iters > 0");
  }
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  const int before = cpu->num_threads();
  const int pool = args.Int("threads", 0) > 0 ? static_cast<int>(args.Int("threads", 0)) : before;
  Stream& s = cpu->default_stream();
  config::ModelConfig cfg;
  cfg.set_hidden_size(static_cast<int32_t>(hidden));
  cfg.mutable_moe()->set_num_experts(static_cast<int32_t>(E));
  cfg.mutable_moe()->set_top_k(static_cast<int32_t>(k));
  cfg.mutable_moe()->set_aux_loss_coeff(0.01);
  cfg.mutable_moe()->set_z_loss_coeff(0.001);
  model::Router router;
  RETURN_IF_ERROR(router.Init(s, "layers.0.mlp.", cfg, 0.02f, 1234));
  ASSIGN_OR_RETURN(Tensor x,
                   Tensor::Empty(*cpu, Shape{T, hidden}, DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::InitNormal(s, x, 7, "bench.router.x", 1.0f));
  ASSIGN_OR_RETURN(Tensor dweights,
                   Tensor::Empty(*cpu, Shape{T * k}, DType::kF32, MemoryCategory::kActivations));
  RETURN_IF_ERROR(ops::Fill(s, dweights, 1.0));
  model::HostReadback read;
  auto run = [&](int threads, double* fwd_ms, double* route_ms, double* bwd_ms) -> absl::Status {
    cpu->SetNumThreads(threads);
    const auto t0 = std::chrono::steady_clock::now();
    read.Reset();
    RETURN_IF_ERROR(router.EnqueueLogits(s, x, 0, &read));
    RETURN_IF_ERROR(read.Start(s));
    RETURN_IF_ERROR(read.Wait());
    const auto t1 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(router.Route(read).status());
    const auto t2 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(router.Backward(s, dweights, 1.0f, 1.0f).status());
    RETURN_IF_ERROR(s.Synchronize());
    const auto t3 = std::chrono::steady_clock::now();
    *fwd_ms = std::chrono::duration<double, std::milli>(t2 - t0).count();
    *route_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
    *bwd_ms = std::chrono::duration<double, std::milli>(t3 - t2).count();
    return absl::OkStatus();
  };
  double f, r, b;
  RETURN_IF_ERROR(run(1, &f, &r, &b));  // warm-up: pages, the pool's threads
  RETURN_IF_ERROR(run(pool, &f, &r, &b));
  std::vector<double> fwd[2], route[2], bwd[2];
  for (int64_t i = 0; i < iters; ++i) {  // interleaved
    for (int which = 0; which < 2; ++which) {
      RETURN_IF_ERROR(run(which == 0 ? 1 : pool, &f, &r, &b));
      fwd[which].push_back(f);
      route[which].push_back(r);
      bwd[which].push_back(b);
    }
  }
  cpu->SetNumThreads(before);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  Measurement row;
  row.params = {{"tokens", absl::StrCat(T)},
                {"experts", absl::StrCat(E)},
                {"top_k", absl::StrCat(k)},
                {"hidden", absl::StrCat(hidden)},
                {"threads", absl::StrCat(pool)}};
  row.figures = {{"forward_1t_ms", median(fwd[0]), "ms"},
                 {"forward_ms", median(fwd[1]), "ms"},
                 {"route_ms", median(route[1]), "ms"},
                 {"backward_1t_ms", median(bwd[0]), "ms"},
                 {"backward_ms", median(bwd[1]), "ms"},
                 {"ns_per_token", 1e6 * median(fwd[1]) / static_cast<double>(T), "ns"}};
  row.ratio_name = "parallel_speedup";
  row.ratio = median(fwd[0]) / median(fwd[1]);
  rep.Add(row);
  rep.Note(absl::StrCat(
      "the router per MoE layer and micro-batch on the CPU backend (forward: logits, scores and choice "
      "on the stream, one read, then the host's plan and losses, route_ms: on a GPU the stream idles "
      "meanwhile), 1 thread vs the pool of ",
      pool, "; parallel_speedup = forward 1 thread / forward on the pool"));
  return absl::OkStatus();
}

Registrar reg("router", "the router per MoE layer: 1 thread vs the pool; the host's routing time", RunRouter);

}  // namespace
}  // namespace moe::bench
