// moe-bench moe-layer: one MoE layer's forward + backward + gradient sync with
// the all-to-all dispatcher, per phase: route (router forward + backward),
// permute (building send rows, un-permute and weighted sum), counts exchange,
// dispatch all-to-all, expert compute, combine all-to-all, gradient sync; and
// the bytes this rank sends to other ranks in each.
//
//   mpirun -np 2 --oversubscribe build/bin/moe-bench moe-layer [tokens=2048]
//       [hidden=256] [ffn=512] [experts=8] [top_k=2] [iters=5] [pairs=3] [--json]
//   MOE_COMM_LINK="bandwidth_gbps=0.5" mpirun ...   # a throttled link (comm_wrapper.h)
//
// Rows: for every EP size that divides the world (TP 1, EP groups of that size,
// every rank one EP rank; EP 1 means each rank alone), overlap_chunks 1 and 3.
// All rows run in the same job on the same cores, so they compare fairly:
// weak scaling keeps tokens per rank and the number of experts fixed, so a rank
// does the same expert work at any EP; ratio weak_scaling = per-rank
// throughput at EP = k / at EP = 1; ratio overlap = time without / with chunks.
// Phase times are means over ranks and iterations; the step is the median
// iteration of the slowest rank.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "launch/bench/bench.h"
#include "model/alltoall_dispatcher.h"
#include "model/moe_layer.h"
#include "parallel/grad_sync.h"
#include "parallel/process_groups.h"
#include "runtime/core/config.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct Result {
  double step = 0, route = 0, permute = 0, counts = 0, dispatch = 0, expert = 0, combine = 0, sync = 0;
  double dispatch_bytes = 0, combine_bytes = 0, sync_bytes = 0;
  double exposed = 0;  // the compute stream's waits for token transfers, timed by events
};

absl::StatusOr<Result> RunOne(comm::Communicator& world, int ep, int chunks, const Args& args) {
  const int64_t tokens = args.Int("tokens", 2048), hidden = args.Int("hidden", 256);
  const int iters = static_cast<int>(args.Int("iters", 5));
  JobConfig job;
  auto* m = job.mutable_model();
  m->set_hidden_size(static_cast<int>(hidden));
  m->set_num_layers(1);
  m->set_num_heads(4);
  m->set_seq_len(static_cast<int>(tokens));
  m->mutable_moe()->set_num_experts(static_cast<int>(args.Int("experts", 8)));
  m->mutable_moe()->set_top_k(static_cast<int>(args.Int("top_k", 2)));
  m->mutable_moe()->set_expert_ffn_hidden_size(static_cast<int>(args.Int("ffn", 512)));
  ApplyDefaults(world.size(), &job);
  const config::ModelConfig& cfg = job.model();

  // EP groups of size ep; a group of `ep` ranks is a world of its own.
  ASSIGN_OR_RETURN(auto sub, world.Split(world.rank() / ep, world.rank(), absl::StrCat("bench_ep", ep)));
  ASSIGN_OR_RETURN(parallel::ProcessGroups groups, parallel::CreateProcessGroups(std::move(sub), 1, ep));
  ASSIGN_OR_RETURN(Backend * backend, GetBackend(Device::Cpu()));
  Stream& stream = backend->default_stream();
  model::ShardPlan plan;
  plan.ep_size = ep;
  plan.ep_rank = groups.layout.ep_rank;
  auto dispatcher_owned = std::make_unique<model::AllToAllTokenDispatcher>(groups.ep.get(), nullptr,
                                                                           cfg.moe().num_experts(), chunks);
  model::AllToAllTokenDispatcher* dispatcher = dispatcher_owned.get();
  model::MoELayer layer;
  RETURN_IF_ERROR(
      layer.Init(stream, "model.layers.0.mlp.", cfg, 0.02f, 0.02f, plan, 1234, std::move(dispatcher_owned)));
  parallel::ParameterList params;
  RETURN_IF_ERROR(params.Add(&layer.router().weight()));
  RETURN_IF_ERROR(params.Add(&layer.experts().gate_proj()));
  RETURN_IF_ERROR(params.Add(&layer.experts().up_proj()));
  RETURN_IF_ERROR(params.Add(&layer.experts().down_proj()));
  ASSIGN_OR_RETURN(auto sync,
                   parallel::GradSync::Create(groups, params, stream, parallel::GradSyncOptions()));

  std::mt19937 rng(99 + world.rank());
  std::normal_distribution<float> normal;
  std::vector<float> xs(tokens * hidden), dys(tokens * hidden);
  for (float& v : xs) v = normal(rng);
  for (float& v : dys) v = 1e-3f * normal(rng);
  ASSIGN_OR_RETURN(Tensor x, Tensor::FromHost(*backend, Shape{tokens, hidden}, DType::kF32, xs.data(),
                                              xs.size() * 4, MemoryCategory::kActivations));
  ASSIGN_OR_RETURN(Tensor dy, Tensor::FromHost(*backend, Shape{tokens, hidden}, DType::kF32, dys.data(),
                                               dys.size() * 4, MemoryCategory::kActivations));
  ASSIGN_OR_RETURN(Tensor zero_dw, Tensor::Zeros(*backend, Shape{tokens * cfg.moe().top_k()}, DType::kF32,
                                                 MemoryCategory::kActivations));

  Result r;
  std::vector<double> steps;
  for (int it = -1; it < iters; ++it) {  // iteration -1 warms up
    if (it == 0) {
      dispatcher->stats().Reset();
      r = Result();
    }
    // Route alone (the same router work the layer does inside Forward/Backward).
    ASSIGN_OR_RETURN(auto barrier, world.Barrier());
    RETURN_IF_ERROR(barrier.Wait());
    auto t0 = Clock::now();
    RETURN_IF_ERROR(layer.router().Forward(stream, x).status());
    RETURN_IF_ERROR(layer.router().Backward(stream, zero_dw, 1.0f, 1.0f).status());
    RETURN_IF_ERROR(stream.Synchronize());
    const double route = Since(t0);
    ASSIGN_OR_RETURN(barrier, world.Barrier());
    RETURN_IF_ERROR(barrier.Wait());
    t0 = Clock::now();
    RETURN_IF_ERROR(layer.Forward(stream, x).status());
    RETURN_IF_ERROR(layer.Backward(stream, dy, 1.0f, 1.0f, 1.0f).status());
    auto t1 = Clock::now();
    for (auto it2 = params.all().rbegin(); it2 != params.all().rend(); ++it2)
      RETURN_IF_ERROR(sync->MarkReady(*it2));
    RETURN_IF_ERROR(sync->Finish());
    const double sync_s = Since(t1);
    const double step = Since(t0);
    // Event times are read once the stream has passed them (outside the timing).
    RETURN_IF_ERROR(stream.Synchronize());
    RETURN_IF_ERROR(dispatcher->CollectEventTimes());
    if (it >= 0) {
      r.route += route / iters;
      r.sync += sync_s / iters;
      steps.push_back(step);
      r.sync_bytes += static_cast<double>(sync->last_step_bytes()) / iters;
    }
  }
  std::sort(steps.begin(), steps.end());
  r.step = steps[steps.size() / 2];  // the median: other jobs share these cores
  const model::DispatchStats& s = dispatcher->stats();
  r.permute = (s.permute_s + s.unpermute_s) / iters;
  r.counts = s.counts_s / iters;
  r.dispatch = s.dispatch_s / iters;
  r.expert = s.expert_s / iters;
  r.combine = s.combine_s / iters;
  r.dispatch_bytes = static_cast<double>(s.dispatch_bytes) / iters;
  r.combine_bytes = static_cast<double>(s.combine_bytes) / iters;
  r.exposed = s.exposed_comm_s / iters;
  // Means over ranks; the step is the slowest rank's.
  double v[11] = {r.route, r.permute,        r.counts,        r.dispatch,   r.expert, r.combine,
                  r.sync,  r.dispatch_bytes, r.combine_bytes, r.sync_bytes, r.exposed};
  ASSIGN_OR_RETURN(auto w, world.AllReduce(v, v, 11, DType::kF64, comm::ReduceOp::kSum));
  RETURN_IF_ERROR(w.Wait());
  double step = r.step;
  ASSIGN_OR_RETURN(w, world.AllReduce(&step, &step, 1, DType::kF64, comm::ReduceOp::kMax));
  RETURN_IF_ERROR(w.Wait());
  const double n = world.size();
  return Result{step,     v[0] / n, v[1] / n, v[2] / n, v[3] / n, v[4] / n,
                v[5] / n, v[6] / n, v[7] / n, v[8] / n, v[9] / n, v[10] / n};
}

absl::Status RunMoeLayer(const Args& args, Reporter& reporter) {
  comm::CommOptions options;
  options.backend = "mpi";
  ASSIGN_OR_RETURN(auto world, comm::CreateWorldCommunicator(options));
  const int64_t tokens = args.Int("tokens", 2048);
  std::vector<int> eps;
  for (int ep = 1; ep <= args.world; ep *= 2)
    if (args.world % ep == 0) eps.push_back(ep);
  double base_throughput[4] = {0, 0, 0, 0};
  for (int ep : eps) {
    double no_overlap_step = 0;
    for (int chunks : {1, 3}) {
      ASSIGN_OR_RETURN(Result r, RunOne(*world, ep, chunks, args));
      const double throughput = tokens / r.step;  // tokens per second per rank
      if (ep == 1) base_throughput[chunks] = throughput;
      if (chunks == 1) no_overlap_step = r.step;
      Measurement m;
      m.params = {{"ranks", absl::StrCat(args.world)},
                  {"ep", absl::StrCat(ep)},
                  {"chunks", absl::StrCat(chunks)},
                  {"tokens/rank", absl::StrCat(tokens)}};
      m.figures = {{"step", r.step * 1e3, "ms"},
                   {"route", r.route * 1e3, "ms"},
                   {"permute", r.permute * 1e3, "ms"},
                   {"counts", r.counts * 1e3, "ms"},
                   {"dispatch", r.dispatch * 1e3, "ms"},
                   {"expert", r.expert * 1e3, "ms"},
                   {"combine", r.combine * 1e3, "ms"},
                   {"exposed_comm", r.exposed * 1e3, "ms"},
                   {"grad_sync", r.sync * 1e3, "ms"},
                   {"dispatch_MB", r.dispatch_bytes / 1e6, "MB"},
                   {"combine_MB", r.combine_bytes / 1e6, "MB"},
                   {"sync_MB", r.sync_bytes / 1e6, "MB"},
                   {"tok/s/rank", throughput, "tok/s"},
                   {"overlap_speedup", no_overlap_step / r.step, "x"}};
      m.ratio_name = "weak_scaling";
      m.ratio = base_throughput[chunks] > 0 ? throughput / base_throughput[chunks] : 0;
      reporter.Add(std::move(m));
    }
  }
  // Overlap at the largest EP, both sides interleaved in this job (1 chunk,
  // 3 chunks, 1, 3, ...): the median of the pairs' step ratios. Run with
  // MOE_COMM_LINK (comm/comm_wrapper.h) to make the link slow enough that
  // communication is about the expert compute.
  const int pairs = static_cast<int>(args.Int("pairs", 3));
  if (args.world > 1 && pairs > 0) {
    std::vector<double> ratios, step1, step3, exposed1, exposed3, expert;
    for (int p = 0; p < pairs; ++p) {
      ASSIGN_OR_RETURN(Result one, RunOne(*world, args.world, 1, args));
      ASSIGN_OR_RETURN(Result three, RunOne(*world, args.world, 3, args));
      ratios.push_back(one.step / three.step);
      step1.push_back(one.step);
      step3.push_back(three.step);
      exposed1.push_back(one.exposed);
      exposed3.push_back(three.exposed);
      expert.push_back(three.expert);
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    Measurement m;
    m.params = {{"ranks", absl::StrCat(args.world)},
                {"ep", absl::StrCat(args.world)},
                {"chunks", "1 vs 3"},
                {"pairs", absl::StrCat(pairs)},
                {"tokens/rank", absl::StrCat(tokens)}};
    m.figures = {{"step_1chunk", median(step1) * 1e3, "ms"},
                 {"step_3chunks", median(step3) * 1e3, "ms"},
                 {"exposed_comm_1chunk", median(exposed1) * 1e3, "ms"},
                 {"exposed_comm_3chunks", median(exposed3) * 1e3, "ms"},
                 {"expert", median(expert) * 1e3, "ms"}};
    m.ratio_name = "overlap_speedup";
    m.ratio = median(ratios);
    reporter.Add(std::move(m));
  }
  reporter.Note(
      "overlap_speedup row: step at 1 chunk / at 3 chunks at EP = world, median of back-to-back pairs "
      "(pairs=N); exposed_comm = the compute stream's waits for token transfers (forward and backward), "
      "timed by events recorded around each wait (Event::ElapsedMsSince), mean over ranks. ");
  reporter.Note(
      "Per iteration: MoE layer forward + backward + gradient sync (router grads over DP, experts over EDP). "
      "route is the router's forward + backward timed alone; dispatch/combine include both directions "
      "(forward transfer and its backward mirror); MB = bytes sent to other ranks. weak_scaling = per-rank "
      "throughput vs EP = 1 with the same chunks (target >= 0.85 at EP = 2); overlap_speedup = step time "
      "with "
      "1 chunk / this row's. step = median over iterations of the slowest rank.");
  return absl::OkStatus();
}

static Registrar reg("moe-layer", "MoE layer forward+backward+grad sync per phase, EP weak scaling, overlap",
                     RunMoeLayer);

}  // namespace
}  // namespace moe::bench
