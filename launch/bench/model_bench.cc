// moe-bench model: whole-model training steps on one rank.
//
//   moe-bench model [config=configs/demo.textproto] [steps=5] [warmup=1]
//                   [micro_batch=<train.micro_batch>] [threads=0] [experts_impl=grouped]
//                   [verbose=1: print the predictor's terms]
//
// Builds the model of the config on the CPU backend (parallel sizes forced to
// 1), allocates AdamW state, and times full steps: zero grads, forward,
// backward, AdamW update of every parameter. Reports tokens/s and the
// forward/backward split, and the measured peak memory of a step (the device
// MemoryTracker, all categories) against runtime/core/memory_model.h's
// PredictPeakMemory for the same config: ratio "measured_vs_predicted"
// (target: within 15%, i.e. 0.85 .. 1.15).
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "launch/bench/bench.h"
#include "model/model.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "runtime/core/memory_model.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double MiB(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

absl::Status RunModel(const Args& args, Reporter& reporter) {
  const std::string path = args.Str("config", "configs/demo.textproto");
  ASSIGN_OR_RETURN(config::JobConfig job, LoadConfigFile(path));
  job.mutable_parallel()->set_tensor(1);
  job.mutable_parallel()->set_expert(1);
  job.mutable_parallel()->set_data(1);
  if (args.kv.count("micro_batch")) {
    job.mutable_train()->set_micro_batch(static_cast<int>(args.Int("micro_batch", 4)));
  }
  if (args.kv.count("experts_impl")) {
    job.mutable_model()->mutable_moe()->set_experts_impl(args.Str("experts_impl", "grouped"));
  }
  ApplyDefaults(1, &job);
  const config::ModelConfig& cfg = job.model();
  const int64_t B = job.train().micro_batch(), S = cfg.seq_len();
  const int steps = static_cast<int>(args.Int("steps", 5));
  const int warmup = static_cast<int>(args.Int("warmup", 1));

  ASSIGN_OR_RETURN(Backend * backend, GetBackend(Device::Cpu()));
  if (args.kv.count("threads")) backend->SetNumThreads(static_cast<int>(args.Int("threads", 0)));
  Stream& stream = backend->default_stream();
  MemoryTracker& mem = backend->memory();
  ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m, model::Model::Create(cfg, stream, job.train().seed()));
  // AdamW state, as the optimizer allocates it.
  std::vector<Tensor> exp_avg, exp_avg_sq;
  for (parallel::Parameter* p : m->parameters()) {
    ASSIGN_OR_RETURN(Tensor a,
                     Tensor::Zeros(*backend, p->value.shape(), DType::kF32, MemoryCategory::kOptimizer));
    ASSIGN_OR_RETURN(Tensor b,
                     Tensor::Zeros(*backend, p->value.shape(), DType::kF32, MemoryCategory::kOptimizer));
    exp_avg.push_back(a);
    exp_avg_sq.push_back(b);
  }
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(B * (S + 1));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % cfg.vocab_size());

  double fwd_s = 0, bwd_s = 0, opt_s = 0, loss_value = 0;
  int64_t measured_peak = 0;
  MemoryStats peak_by_cat[kNumMemoryCategories];
  for (int step = 0; step < warmup + steps; ++step) {
    mem.ResetPeak();
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(m->ZeroGrads(stream));
    ASSIGN_OR_RETURN(model::LossParts loss, m->Forward(stream, tokens, B));
    const auto t1 = Clock::now();
    RETURN_IF_ERROR(m->Backward(stream, 1.0f));
    RETURN_IF_ERROR(stream.Synchronize());
    const auto t2 = Clock::now();
    for (size_t i = 0; i < m->parameters().size(); ++i) {
      parallel::Parameter* p = m->parameters()[i];
      RETURN_IF_ERROR(ops::AdamW(stream, p->value, p->grad, exp_avg[i], exp_avg_sq[i], 1e-4f, 0.9f, 0.95f,
                                 1e-8f, p->weight_decay ? 0.1f : 0.0f, step + 1));
    }
    RETURN_IF_ERROR(stream.Synchronize());
    const auto t3 = Clock::now();
    measured_peak = std::max(measured_peak, mem.Total().peak_bytes);
    for (int c = 0; c < kNumMemoryCategories; ++c) {
      MemoryStats st = mem.Stats(static_cast<MemoryCategory>(c));
      peak_by_cat[c].peak_bytes = std::max(peak_by_cat[c].peak_bytes, st.peak_bytes);
    }
    if (step < warmup) continue;
    fwd_s += Seconds(t0, t1);
    bwd_s += Seconds(t1, t2);
    opt_s += Seconds(t2, t3);
    loss_value = loss.total();
  }
  ASSIGN_OR_RETURN(MemoryPrediction pred, PredictPeakMemory(job));
  const double step_s = (fwd_s + bwd_s + opt_s) / steps;
  const double tokens_per_s = static_cast<double>(B * S) / ((fwd_s + bwd_s) / steps);

  Measurement row;
  row.params = {{"config", path},
                {"micro_batch", absl::StrCat(B)},
                {"seq_len", absl::StrCat(S)},
                {"experts", cfg.moe().experts_impl()},
                {"threads", absl::StrCat(backend->num_threads())}};
  row.figures = {{"tokens_per_s", tokens_per_s, "tok/s"},
                 {"forward_ms", 1e3 * fwd_s / steps, "ms"},
                 {"backward_ms", 1e3 * bwd_s / steps, "ms"},
                 {"adamw_ms", 1e3 * opt_s / steps, "ms"},
                 {"step_ms", 1e3 * step_s, "ms"},
                 {"loss", loss_value, ""},
                 {"peak_measured", MiB(measured_peak), "MiB"},
                 {"peak_predicted", MiB(pred.peak_bytes), "MiB"}};
  row.ratio_name = "measured_vs_predicted";
  row.ratio = static_cast<double>(measured_peak) / static_cast<double>(pred.peak_bytes);
  reporter.Add(row);
  std::string cats = "peak by category, measured / predicted (MiB):";
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    absl::StrAppend(&cats, " ", MemoryCategoryName(static_cast<MemoryCategory>(c)), " ",
                    absl::StrFormat("%.2f/%.2f", MiB(peak_by_cat[c].peak_bytes), MiB(pred.bytes[c])));
  }
  reporter.Note(cats);
  if (args.Int("verbose", 0) != 0) {
    reporter.Note(absl::StrCat("predicted terms:\n", pred.Report()));
    reporter.Note(absl::StrCat("measured (last step):\n", mem.Report()));
  }
  reporter.Note(absl::StrCat("tokens/s counts forward + backward of ", B, " x ", S,
                             " tokens; the step adds AdamW. Target: measured_vs_predicted "
                             "within 0.85 .. 1.15."));
  return absl::OkStatus();
}

Registrar reg("model", "whole-model forward+backward tokens/s and peak memory vs prediction (1 rank)",
              RunModel);

}  // namespace
}  // namespace moe::bench
