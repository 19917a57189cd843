// moe-bench model: whole-model training steps on one rank.
//
//   moe-bench model [config=configs/demo.textproto] [steps=5] [warmup=1]
//                   [micro_batch=<train.micro_batch>] [threads=0] [experts_impl=grouped]
//                   [sgemm=2048] [openblas_sgemm=1] [verbose=1: per-op time breakdown and the predictor's
//                   terms] [device=cpu|cuda|cuda:N] [peak_tflops=989: the GPU's dense peak, for mfu_vs_peak]
//                   [FIELD.PATH=VALUE ...: config overrides, e.g. model.seq_len=256]
//
// Builds the model of the config on the device= backend (parallel sizes forced to
// 1), creates the trainer's optimizer, and times full steps: zero grads, forward,
// backward, the gradient norm (optim.clip_grad, default 1.0: the trainer's
// optim::GlobalGradNorm over a 1-rank world, with its one host read;
// optim.clip_grad=0 leaves it out), and the trainer's optimizer step
// (optim::Optimizer of the config's optim, AdamW by default, at lr 1e-4: it
// reads the gradients times the clipping coefficient and, in
// train.precision=bf16, writes the bf16 copies in its pass). Reports tokens/s and the
// forward/backward split, and the measured peak memory of a step (the device
// MemoryTracker, all categories) against runtime/core/memory_model.h's
// PredictPeakMemory for the same config: "measured_vs_predicted" (target:
// within 15%, i.e. 0.85 .. 1.15).
//
// Model-FLOPs utilisation ("mfu"): model FLOPs of forward + backward per step
// divided by the mean step time (zero grads + forward + backward + norm + optimizer step),
// over the GFLOP/s of one sgemm of sgemm x sgemm x sgemm through the same
// backend and threads, timed before every step and after the last one, each
// step compared with the mean of the samples on either side of it (so both
// sides see the same machine load); on the CPU the same sgemm is also timed as one
// cblas_sgemm on OpenBLAS's own threads (openblas_sgemm=0 skips it; its threads
// are parked after each timing, so their spin-wait does not take a core from
// what is timed next) and the faster of the two is the reference. Target: mfu >= 0.40. Model FLOPs, for T = B
// * S tokens, per layer (forward):
//   attention projections  2 T d (2 H hd + 2 Hkv hd)
//   attention core         2 B H hd S (S + 1)    (q k^T and p v over the causal half only)
//   MoE layer              2 T d E (router) + 6 T k d Fe (experts; every routed assignment)
//   dense layer            6 T d F
// plus the LM head 2 T d V; backward counts twice the forward (dX and dW), so a
// step is 3 x forward. Norms, softmax, RoPE and the optimizer count no FLOPs,
// and nothing recomputed in backward is counted.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/communicator.h"
#include "launch/bench/bench.h"
#include "model/model.h"
#include "optim/clip.h"
#include "optim/optimizer.h"
#include "parallel/process_groups.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "runtime/core/device_select.h"
#include "runtime/core/memory_model.h"
#include "runtime/core/op_profile.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

// OpenBLAS's own (not in cblas.h): stops its thread pool; weak, so a build
// without it (a serial OpenBLAS) links and skips the call.
extern "C" int blas_thread_shutdown_(void) __attribute__((weak));

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double MiB(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

// Model FLOPs of one forward + backward of B sequences of S tokens (the header's formula).
double TrainingFlops(const config::ModelConfig& cfg, int64_t B, int64_t S) {
  const double T = static_cast<double>(B * S), d = cfg.hidden_size(), H = cfg.num_heads(),
               Hkv = cfg.num_kv_heads(), hd = d / H, V = cfg.vocab_size();
  double fwd = 2 * T * d * V;
  for (int l = 0; l < cfg.num_layers(); ++l) {
    fwd += 2 * T * d * (2 * H * hd + 2 * Hkv * hd);
    fwd += 2.0 * B * H * hd * S * (S + 1);
    if (IsMoeLayer(cfg, l)) {
      const double E = cfg.moe().num_experts(), k = cfg.moe().top_k(),
                   Fe = cfg.moe().expert_ffn_hidden_size();
      fwd += 2 * T * d * E + 6 * T * k * d * Fe;
    } else {
      fwd += 6 * T * d * cfg.ffn_hidden_size();
    }
  }
  return 3 * fwd;
}

absl::Status RunModel(const Args& args, Reporter& reporter) {
  const std::string path = args.Str("config", "configs/demo.textproto");
  ASSIGN_OR_RETURN(config::JobConfig job, LoadConfigFile(path));
  for (const auto& [key, value] : args.kv) {  // config fields: model.hidden_size=256
    if (key.find('.') != std::string::npos)
      RETURN_IF_ERROR(ApplyOverride(absl::StrCat(key, "=", value), &job));
  }
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

  std::string placement;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cpu"), &placement));
  ASSIGN_OR_RETURN(Backend * backend, GetBackend(device));
  if (args.kv.count("threads")) backend->SetNumThreads(static_cast<int>(args.Int("threads", 0)));
  Stream& stream = backend->default_stream();
  MemoryTracker& mem = backend->memory();
  // train.precision (bf16: bf16 weight copies and activations, refreshed after the update).
  const DType compute_dtype = job.train().precision() == "bf16" ? DType::kBF16 : DType::kF32;
  ASSIGN_OR_RETURN(std::unique_ptr<model::Model> m,
                   model::Model::Create(cfg, stream, job.train().seed(), {}, {}, compute_dtype));
  // The trainer's gradient clipping runs over process groups: a world of this rank.
  comm::CommOptions comm_options;
  comm_options.backend = "mpi";
  ASSIGN_OR_RETURN(auto world, comm::CreateWorldCommunicator(comm_options));
  ASSIGN_OR_RETURN(parallel::ProcessGroups groups, parallel::CreateProcessGroups(std::move(world), 1, 1));
  const double clip_grad = job.optim().clip_grad();
  // The trainer's optimizer and its state.
  ASSIGN_OR_RETURN(
      std::unique_ptr<optim::Optimizer> optimizer,
      optim::CreateOptimizer(job.optim(), const_cast<parallel::ParameterList&>(m->parameters()), groups));
  // The sgemm the step is compared with: c = a b, square, through the backend.
  // Its buffers live only while it runs, so they are not in the step's peak.
  const int64_t n = args.Int("sgemm", 2048);
  auto time_sgemm = [&]() -> absl::StatusOr<double> {
    std::vector<Tensor> abc;
    for (double v : {0.5, 0.25, 0.0}) {
      ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(*backend, Shape{n, n}, DType::kF32, MemoryCategory::kOther));
      RETURN_IF_ERROR(ops::Fill(stream, t, v));
      abc.push_back(t);
    }
    RETURN_IF_ERROR(stream.Synchronize());
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(ops::Gemm(stream, abc[0], false, abc[1], false, abc[2]));
    RETURN_IF_ERROR(stream.Synchronize());
    return Seconds(t0, Clock::now());
  };
  // On the CPU the backend runs OpenBLAS single-threaded on its own pool's tiles
  // (cpu_gemm.cc); the same sgemm is also timed as one cblas_sgemm on
  // OpenBLAS's own threads, and mfu divides by the faster of the two, so the
  // backend's GEMM threading cannot flatter the ratio.
  // OpenBLAS's threads spin-wait (sched_yield) for about 2^28 TSC ticks (~0.1 s)
  // after a threaded call, taking a core from whatever is timed next (the
  // backend's sgemm, then the step) on a small machine; the trainer never runs
  // them. So they are started by an untimed call before the timed one and parked
  // after it (blas_thread_shutdown_, where this OpenBLAS has it; the next
  // threaded call starts them again).
  auto time_openblas = [&]() -> absl::StatusOr<double> {
    std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n, 0.0f);
    openblas_set_num_threads(backend->num_threads());
    auto sgemm = [&](int64_t size) {
      const int sz = static_cast<int>(size);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, sz, sz, sz, 1.0f, a.data(), sz, b.data(), sz,
                  0.0f, c.data(), sz);
    };
    sgemm(std::min<int64_t>(n, 256));
    const auto t0 = Clock::now();
    sgemm(n);
    const double s = Seconds(t0, Clock::now());
    openblas_set_num_threads(1);
    if (blas_thread_shutdown_ != nullptr) blas_thread_shutdown_();
    return s;
  };
  const bool cpu_openblas = device.is_cpu() && args.Int("openblas_sgemm", 1) != 0;
  RETURN_IF_ERROR(time_sgemm().status());  // warm-up: threads, pages
  if (cpu_openblas) RETURN_IF_ERROR(time_openblas().status());
  // Reference sgemm times, one pair before every step and one after the last:
  // step i is compared with the mean of the samples before and after it.
  std::vector<double> sgemm_samples, openblas_samples;
  auto sample_reference = [&]() -> absl::Status {
    double one_openblas_s = 0;
    if (cpu_openblas) {
      ASSIGN_OR_RETURN(one_openblas_s, time_openblas());
    }
    ASSIGN_OR_RETURN(const double one_sgemm_s, time_sgemm());
    openblas_samples.push_back(one_openblas_s);
    sgemm_samples.push_back(one_sgemm_s);
    return absl::OkStatus();
  };
  const bool verbose = args.Int("verbose", 0) != 0;
  OpProfile profile;
  std::mt19937 rng(1);
  std::vector<int32_t> tokens(B * (S + 1));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % cfg.vocab_size());

  double fwd_s = 0, bwd_s = 0, clip_s = 0, opt_s = 0, loss_value = 0;
  int64_t measured_peak = 0;
  MemoryStats peak_by_cat[kNumMemoryCategories];
  for (int step = 0; step < warmup + steps; ++step) {
    RETURN_IF_ERROR(sample_reference());
    mem.ResetPeak();
    OpProfiler::Enable(verbose && step >= warmup);
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(m->ZeroGrads(stream));
    ASSIGN_OR_RETURN(model::LossParts loss, m->Forward(stream, tokens, B));
    if (!device.is_cpu()) RETURN_IF_ERROR(stream.Synchronize());  // a GPU runs ahead of the host
    const auto t1 = Clock::now();
    RETURN_IF_ERROR(m->Backward(stream, 1.0f));
    RETURN_IF_ERROR(stream.Synchronize());
    const auto t2 = Clock::now();
    double grad_scale = 1.0;  // the clipping coefficient, as the trainer passes it
    if (clip_grad > 0) {
      ASSIGN_OR_RETURN(const double norm, optim::GlobalGradNorm(m->parameters(), groups));
      grad_scale = optim::ClipCoefficient(norm, clip_grad);
    }
    const auto t2c = Clock::now();  // the norm read
    RETURN_IF_ERROR(optimizer->Step(1e-4, grad_scale));
    RETURN_IF_ERROR(stream.Synchronize());
    const auto t3 = Clock::now();
    OpProfiler::Enable(false);
    measured_peak = std::max(measured_peak, mem.Total().peak_bytes);
    for (int c = 0; c < kNumMemoryCategories; ++c) {
      MemoryStats st = mem.Stats(static_cast<MemoryCategory>(c));
      peak_by_cat[c].peak_bytes = std::max(peak_by_cat[c].peak_bytes, st.peak_bytes);
    }
    if (step < warmup) continue;
    fwd_s += Seconds(t0, t1);
    bwd_s += Seconds(t1, t2);
    clip_s += Seconds(t2, t2c);
    opt_s += Seconds(t2c, t3);
    loss_value = loss.total();
  }
  RETURN_IF_ERROR(sample_reference());
  double sgemm_s = 0, openblas_s = 0;
  for (int step = warmup; step < warmup + steps; ++step) {
    sgemm_s += 0.5 * (sgemm_samples[step] + sgemm_samples[step + 1]);
    openblas_s += 0.5 * (openblas_samples[step] + openblas_samples[step + 1]);
  }
  ASSIGN_OR_RETURN(MemoryPrediction pred, PredictPeakMemory(job));
  const double step_s = (fwd_s + bwd_s + clip_s + opt_s) / steps;
  const double sgemm_gflops = 2.0 * n * n * n / (sgemm_s / steps) * 1e-9;
  const double openblas_gflops = cpu_openblas ? 2.0 * n * n * n / (openblas_s / steps) * 1e-9 : 0.0;
  const double ref_gflops = std::max(sgemm_gflops, openblas_gflops);
  const double model_gflops = TrainingFlops(cfg, B, S) / step_s * 1e-9;
  const double tokens_per_s = static_cast<double>(B * S) / ((fwd_s + bwd_s) / steps);

  Measurement row;
  row.params = {{"config", path},
                {"micro_batch", absl::StrCat(B)},
                {"seq_len", absl::StrCat(S)},
                {"experts", cfg.moe().experts_impl()},
                {"threads", absl::StrCat(backend->num_threads())},
                {"device", placement}};
  row.figures = {{"tokens_per_s", tokens_per_s, "tok/s"},
                 {"forward_ms", 1e3 * fwd_s / steps, "ms"},
                 {"backward_ms", 1e3 * bwd_s / steps, "ms"},
                 {"clip_ms", 1e3 * clip_s / steps, "ms"},
                 {"optimizer_ms", 1e3 * opt_s / steps, "ms"},
                 {"step_ms", 1e3 * step_s, "ms"},
                 {"model_gflops", model_gflops, "GFLOP/s"},
                 {"sgemm_gflops", sgemm_gflops, "GFLOP/s"},
                 {"sgemm_openblas_gflops", openblas_gflops, "GFLOP/s"},
                 {"mfu", model_gflops / ref_gflops, ""},
                 {"loss", loss_value, ""},
                 {"peak_measured", MiB(measured_peak), "MiB"},
                 {"peak_predicted", MiB(pred.peak_bytes), "MiB"}};
  if (!device.is_cpu()) {
    // On a GPU also against the device's dense peak (peak_tflops=, default 989: H100/H200 SXM bf16).
    const double peak = args.Double("peak_tflops", 989.0);
    row.figures.push_back({"mfu_vs_peak", model_gflops / (peak * 1e3), ""});
  }
  if (verbose) {
    // Per-step time by kind of work (host-timed and stream-timed together: an op is
    // one or the other), as figures so that --json carries them.
    profile = OpProfiler::Take();
    profile.DivideBy(steps);
    for (int c = 0; c < kNumProfileCategories; ++c) {
      const double ms = 1e3 * (profile.seconds[c] + profile.stream_seconds[c]);
      if (profile.calls[c] + profile.stream_calls[c] > 0)
        row.figures.push_back(
            {absl::StrCat("ms_", ProfileCategoryName(static_cast<ProfileCategory>(c))), ms, "ms"});
    }
  }
  row.ratio_name = "measured_vs_predicted";
  row.ratio = static_cast<double>(measured_peak) / static_cast<double>(pred.peak_bytes);
  reporter.Add(row);
  std::string cats = "peak by category, measured / predicted (MiB):";
  for (int c = 0; c < kNumMemoryCategories; ++c) {
    absl::StrAppend(&cats, " ", MemoryCategoryName(static_cast<MemoryCategory>(c)), " ",
                    absl::StrFormat("%.2f/%.2f", MiB(peak_by_cat[c].peak_bytes), MiB(pred.bytes[c])));
  }
  reporter.Note(cats);
  if (verbose) {
    reporter.Note(
        absl::StrCat("time per step by kind of work (host-timed ops and regions; ops on "
                     "asynchronous streams, as on a GPU, timed by events around each; ",
                     absl::StrFormat("%.2f", 1e3 * step_s), " ms step):\n", profile.Report(step_s)));
    reporter.Note(absl::StrCat("predicted terms:\n", pred.Report()));
    reporter.Note(absl::StrCat("measured (last step):\n", mem.Report()));
  }
  reporter.Note(
      absl::StrCat("tokens/s counts forward + backward of ", B, " x ", S,
                   " tokens; the step adds the gradient norm for clipping (optim.clip_grad ", clip_grad,
                   ") and the optimizer step (", optimizer->type_name(), "). mfu = model FLOPs (",
                   absl::StrFormat("%.3f", TrainingFlops(cfg, B, S) * 1e-9),
                   " GFLOP per step, formula in model_bench.cc) / step time / the GFLOP/s of a ", n,
                   "^3 sgemm timed before and after each step (on the CPU the faster of the backend's "
                   "and one cblas_sgemm on OpenBLAS's threads). Targets: mfu >= 0.40; measured_vs_predicted "
                   "within 0.85 .. 1.15."));
  return absl::OkStatus();
}

Registrar reg("model", "whole-model forward+backward tokens/s and peak memory vs prediction (1 rank)",
              RunModel);

}  // namespace
}  // namespace moe::bench
