#include "runtime/trainer.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "comm/agree.h"
#include "model/alltoall_dispatcher.h"
#include "model/llep.h"
#include "optim/clip.h"
#include "runtime/checkpoint_signal.h"
#include "runtime/core/device_select.h"
#include "runtime/core/logging.h"
#include "runtime/core/status.h"
#include "runtime/core/trace.h"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

double MaxOverMean(const std::vector<int64_t>& counts) {
  int64_t total = 0, max = 0;
  for (int64_t c : counts) {
    total += c;
    max = std::max(max, c);
  }
  if (total == 0) return 1.0;
  return static_cast<double>(max) * static_cast<double>(counts.size()) / static_cast<double>(total);
}

std::string Bytes(int64_t bytes) {
  if (bytes >= (int64_t{1} << 30)) return absl::StrFormat("%.2f GiB", bytes / double(int64_t{1} << 30));
  return absl::StrFormat("%.1f MiB", bytes / double(1 << 20));
}

constexpr char kJobWidePayload[] = "moe.job_wide_error";

absl::Status JobWideError(absl::Status status) {
  status.SetPayload(kJobWidePayload, absl::Cord("every rank"));
  return status;
}

}  // namespace

bool IsJobWideError(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kJobWidePayload).has_value();
}

Trainer::Trainer(const JobConfig& config, parallel::ProcessGroups* groups)
    : config_(config), groups_(groups) {}
Trainer::~Trainer() {
  if (profiler_) (void)profiler_->Stop();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const JobConfig& config,
                                                         parallel::ProcessGroups* groups,
                                                         std::shared_ptr<Profiler> profiler) {
  std::unique_ptr<Trainer> t(new Trainer(config, groups));
  const parallel::RankLayout& layout = groups->layout;
  t->profiler_ = profiler ? std::move(profiler) : std::make_shared<Profiler>();
  const auto& train = config.train();
  std::string placement;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(train.device(), &placement));
  ASSIGN_OR_RETURN(t->backend_, GetBackend(device));
  if (device.is_cpu()) {
    MOE_LOG_RANK0(INFO) << "ranks compute on cpu";
  } else {
    MOE_LOG(INFO) << "rank " << layout.rank << " computes on " << placement;  // one GPU per rank
  }
  t->stream_ = &t->backend_->default_stream();
  // train.threads_per_rank > 0 sets this rank's compute threads; 0 keeps the
  // backend's (OPENBLAS_NUM_THREADS, which moe-launch sets, or all cores).
  if (train.threads_per_rank() > 0) t->backend_->SetNumThreads(train.threads_per_rank());

  // Data first: every data problem is reported before the model is allocated.
  // The ranks agree on the outcome (the only collective before the model), so
  // on a data error every rank returns a job-wide error and can exit 1 by
  // itself instead of one rank aborting the others. On the control plane's
  // world, never the data plane's (NCCL takes device buffers only).
  absl::StatusOr<std::unique_ptr<data::TrainingData>> opened = data::OpenTrainingData(config, layout.dp);
  absl::Status agreed;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*groups->host.world, opened.status(), &agreed));
  if (!agreed.ok()) return JobWideError(agreed);
  t->data_ = std::move(*opened);
  MOE_LOG_RANK0(INFO) << t->data_->Summary();

  model::ShardPlan plan;
  plan.tp_size = layout.tp;
  plan.tp_rank = layout.tp_rank;
  plan.ep_size = layout.ep;
  plan.ep_rank = layout.ep_rank;
  plan.tp_group = groups->tp.get();
  plan.expert_tp = config.parallel().expert_tensor_parallel();
  // Expert parallelism (and TED's duplicate-token dropping under TP, when the
  // experts are replicated over TP) goes through the all-to-all dispatcher; a
  // single rank permutes locally.
  model::DispatcherFactory dispatchers;
  if (layout.ep > 1 || layout.tp > 1) {
    const int64_t num_experts = config.model().moe().num_experts();
    const int chunks = config.parallel().overlap_chunks();
    comm::Communicator* ted = model::TedGroup(plan);
    dispatchers = [groups, ted, num_experts, chunks](int) -> std::unique_ptr<model::TokenDispatcher> {
      return std::make_unique<model::AllToAllTokenDispatcher>(groups->ep.get(), ted, num_experts, chunks);
    };
  }
  ASSIGN_OR_RETURN(t->model_,
                   model::Model::Create(config.model(), *t->stream_, train.seed(), plan, dispatchers,
                                        train.precision() == "bf16" ? DType::kBF16 : DType::kF32));
  // LLEP (issue 7): no-op unless llep.enabled and EP > 1. Measured rates are
  // agreed over the whole job (every EP group plans with the same numbers, as
  // a resumed run will from its checkpoint) and the runners rebuilt with them.
  comm::Communicator* ep_tp = layout.tp > 1 ? groups->tp.get() : nullptr;
  RETURN_IF_ERROR(model::EnableLlep(*t->model_, config.model(), config.llep(), groups->host.ep.get(),
                                    groups->ep_p2p.get(), ep_tp, *t->stream_, &t->llep_rates_));
  if (t->MeasuresLlepRates()) {
    double v[2] = {t->llep_rates_.gemm_flops_per_s, t->llep_rates_.p2p_bytes_per_s};
    ASSIGN_OR_RETURN(comm::Work w, groups->host.world->AllReduce(v, v, 2, DType::kF64, comm::ReduceOp::kMin));
    RETURN_IF_ERROR(w.Wait());
    t->llep_rates_ = {v[0], v[1]};
    RETURN_IF_ERROR(model::EnableLlep(*t->model_, config.model(), config.llep(), groups->host.ep.get(),
                                      groups->ep_p2p.get(), ep_tp, *t->stream_, &t->llep_rates_));
    MOE_LOG_RANK0(INFO) << "llep: measured " << v[0] / 1e9 << " GFLOP/s, " << v[1] / 1e9
                        << " GB/s (kept in checkpoints)";
  }
  parallel::GradSyncOptions sync_options;
  sync_options.bucket_mb = config.parallel().grad_bucket_mb();
  ASSIGN_OR_RETURN(t->grad_sync_,
                   parallel::GradSync::Create(*groups, t->model_->parameters(), *t->stream_, sync_options));
  // Each block's parameters, marked ready for gradient sync as its backward ends.
  t->block_params_.resize(t->model_->num_layers());
  for (int l = 0; l < t->model_->num_layers(); ++l) {
    parallel::ParameterList list;
    RETURN_IF_ERROR(t->model_->block(l).CollectParameters(&list));
    t->block_params_[l].assign(list.all().begin(), list.all().end());
  }
  ASSIGN_OR_RETURN(
      t->optimizer_,
      optim::CreateOptimizer(config.optim(), const_cast<parallel::ParameterList&>(t->model_->parameters()),
                             *groups));
  ASSIGN_OR_RETURN(optim::LrSchedule schedule, optim::LrSchedule::FromConfig(config.optim()));
  t->schedule_ = schedule;
  t->tokens_.resize(static_cast<size_t>(train.grad_accum()) * train.micro_batch() *
                    (config.model().seq_len() + 1));

  ASSIGN_OR_RETURN(t->checkpointer_, Checkpointer::Create(*groups->host.world, layout,
                                                          CheckpointOptionsFromConfig(config.checkpoint())));
  t->checkpoint_tensors_ = ModelTensors(t->model_->parameters());
  for (ShardedTensor& b : ModelTensors(t->model_->buffers())) t->checkpoint_tensors_.push_back(std::move(b));
  AppendOptimizerTensors(*t->optimizer_, t->model_->parameters(), t->checkpoint_tensors_);
  RETURN_IF_ERROR(t->Resume());

  if (layout.rank == 0) {
    std::error_code ec;
    std::filesystem::create_directories(train.run_dir(), ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("cannot create train.run_dir '", train.run_dir(), "': ", ec.message()));
    }
    // A resumed run continues the metrics of the run it resumes.
    ASSIGN_OR_RETURN(MetricsWriter w, MetricsWriter::Open(train.run_dir() + "/metrics.jsonl", t->resumed_));
    t->metrics_.emplace(std::move(w));
  }
  ProfileOptions profile;
  profile.trace = config.profile().trace();
  profile.trace_dir = config.profile().trace_dir();
  profile.trace_start = config.profile().trace_start();
  profile.trace_steps = config.profile().trace_steps();
  if (profile.trace) {
    RETURN_IF_ERROR(t->profiler_->AlignClocks(*groups->host.world));
    MOE_LOG_RANK0(INFO) << "profile: tracing steps " << profile.trace_start + 1 << ".."
                        << profile.trace_start + profile.trace_steps << " into " << profile.trace_dir
                        << "/rank_<r>.json";
  }
  t->profiler_->Start(profile, layout.rank, layout.world,
                      absl::StrFormat("rank %d (tp %d, ep %d, dp %d)", layout.rank, layout.tp_rank,
                                      layout.ep_rank, layout.dp_rank));
  MOE_LOG_RANK0(INFO) << "model: " << t->model_->parameters().GlobalNumel() << " parameters ("
                      << t->model_->parameters().LocalNumel() << " on this rank), optimizer "
                      << t->optimizer_->type_name() << ", " << schedule.ToString() << ", precision "
                      << train.precision();
  return t;
}

bool Trainer::MeasuresLlepRates() const {
  const config::LlepConfig& l = config_.llep();
  return l.enabled() && groups_->layout.ep > 1 && l.cost_model() &&
         (l.gemm_gflops() <= 0 || l.p2p_gbps() <= 0);
}

absl::Status Trainer::Resume() {
  ASSIGN_OR_RETURN(std::optional<LoadedCheckpoint> loaded,
                   checkpointer_->Resume(config_.train().resume(), checkpoint_tensors_));
  if (!loaded.has_value()) return absl::OkStatus();
  for (const std::string& why : loaded->skipped) MOE_LOG_RANK0(WARNING) << "resume skipped " << why;
  const TrainState& state = loaded->state;
  if (state.sampler_state.size() != 2) {
    return absl::DataLossError(absl::StrCat("checkpoint ", loaded->path, ": the sampler state has ",
                                            state.sampler_state.size(), " values, expected 2"));
  }
  RETURN_IF_ERROR(
      data_->train->Restore(data::SamplerState::FromInts({state.sampler_state[0], state.sampler_state[1]})));
  auto opt_step = state.int_values.find("optimizer.step");
  optimizer_->set_step(opt_step != state.int_values.end() ? opt_step->second : state.step);
  // The checkpoint holds f32 masters (whatever precision wrote it): round them
  // into the bf16 compute copies of this run.
  RETURN_IF_ERROR(model_->RefreshComputeWeights(*stream_));
  RETURN_IF_ERROR(stream_->Synchronize());
  step_ = state.step;
  resumed_ = true;
  // Plan LLEP with the rates the saved run measured, not new ones.
  auto gemm = state.double_values.find("llep.gemm_flops_per_s");
  auto p2p = state.double_values.find("llep.p2p_bytes_per_s");
  if (MeasuresLlepRates() && gemm != state.double_values.end() && p2p != state.double_values.end()) {
    llep_rates_ = {gemm->second, p2p->second};
    RETURN_IF_ERROR(model::EnableLlep(
        *model_, config_.model(), config_.llep(), groups_->host.ep.get(), groups_->ep_p2p.get(),
        groups_->layout.tp > 1 ? groups_->tp.get() : nullptr, *stream_, &llep_rates_));
    MOE_LOG_RANK0(INFO) << "llep: rates from the checkpoint, " << llep_rates_.gemm_flops_per_s / 1e9
                        << " GFLOP/s, " << llep_rates_.p2p_bytes_per_s / 1e9 << " GB/s";
  }
  MOE_LOG_RANK0(INFO) << "resumed from " << loaded->path << " at step " << step_;
  return absl::OkStatus();
}

absl::Status Trainer::SaveCheckpoint() {
  trace::Span span("checkpoint save");
  TrainState state;
  state.step = step_;
  state.consumed_samples = step_ * data_->train->global_batch();
  std::array<int64_t, 2> sampler = data_->train->state().ToInts();
  state.sampler_state.assign(sampler.begin(), sampler.end());
  // The model draws no random numbers after initialisation: the seed is its RNG state.
  state.rng.push_back({"init", config_.train().seed(), 0});
  state.lr_step = optimizer_->step();
  state.int_values["optimizer.step"] = optimizer_->step();
  if (MeasuresLlepRates()) {
    state.double_values["llep.gemm_flops_per_s"] = llep_rates_.gemm_flops_per_s;
    state.double_values["llep.p2p_bytes_per_s"] = llep_rates_.p2p_bytes_per_s;
  }
  // A checkpoint is never written from non-finite numbers: resuming it could
  // only reproduce the failure, and it would replace a good one under
  // checkpoint.keep_last.
  std::vector<std::pair<std::string, Tensor>> tensors;
  tensors.reserve(checkpoint_tensors_.size());
  for (const ShardedTensor& t : checkpoint_tensors_) tensors.emplace_back(t.name, t.tensor);
  ASSIGN_OR_RETURN(std::optional<std::string> bad,
                   optim::FirstNonFiniteTensor(tensors, *groups_->host.world));
  if (bad.has_value()) {
    return absl::DataLossError(absl::StrCat("step ", step_, ": ", *bad,
                                            " holds NaN or Inf; refusing to save a checkpoint from it (the "
                                            "checkpoints already in ",
                                            config_.checkpoint().dir(), " are kept)"));
  }
  return checkpointer_->Save(state, checkpoint_tensors_, ConfigToText(config_));
}

absl::StatusOr<std::vector<double>> Trainer::SumOverDataParallel(std::vector<double> values) {
  if (groups_->host.dp->size() > 1) {
    trace::Span span(*stream_, "metrics all-reduce", trace::Kind::kComm);
    ASSIGN_OR_RETURN(comm::Work w, groups_->host.dp->AllReduce(values.data(), values.data(), values.size(),
                                                               DType::kF64, comm::ReduceOp::kSum));
    RETURN_IF_ERROR(w.Wait());
  }
  return values;
}

absl::Status Trainer::ReadMicroBatches(int count, const std::function<absl::Status(int, int32_t*)>& read) {
  // A read can fail on some ranks only (a .bin truncated under the job fails
  // the ranks whose next read comes after the truncation): the ranks agree
  // before the step's first collective, so every rank stops here with the
  // same message instead of one leaving the others in the all-to-all.
  trace::Span span("data");
  const size_t per = static_cast<size_t>(config_.train().micro_batch()) * (config_.model().seq_len() + 1);
  absl::Status local = absl::OkStatus();
  for (int a = 0; a < count && local.ok(); ++a) local = read(a, tokens_.data() + a * per);
  absl::Status agreed;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*groups_->host.world, local, &agreed));
  if (!agreed.ok()) return JobWideError(agreed);
  return absl::OkStatus();
}

absl::StatusOr<StepStats> Trainer::TrainStep() {
  const auto start = Clock::now();
  const parallel::RankLayout& layout = groups_->layout;
  const int grad_accum = config_.train().grad_accum();
  const int64_t micro_batch = config_.train().micro_batch();
  const double num_micro_batches = static_cast<double>(layout.dp) * grad_accum;
  const float loss_scale = static_cast<float>(1.0 / num_micro_batches);

  std::vector<int> moe_layers;
  for (int l = 0; l < model_->num_layers(); ++l)
    if (model_->block(l).is_moe()) moe_layers.push_back(l);
  profiler_->BeginStep(step_ + 1, moe_layers);
  std::optional<trace::Span> step_span;
  step_span.emplace(*stream_, "step");
  RETURN_IF_ERROR(model_->ZeroGrads(*stream_));
  model_->SetStep(step_ + 1);  // the coupling loss's noise of this step
  const int64_t E = config_.model().moe().num_experts();
  // Loss parts, then per MoE layer E kept counts and the dropped count, then
  // per MoE layer the LLEP figures (fired, imbalance before/after, tokens and
  // weight bytes moved).
  constexpr int kLlepFields = 5;
  constexpr size_t kParts = 4;  // ce, aux, z, erc
  const size_t llep_base = kParts + moe_layers.size() * (E + 1);
  std::vector<double> sums(llep_base + moe_layers.size() * kLlepFields, 0.0);

  RETURN_IF_ERROR(ReadMicroBatches(
      grad_accum, [&](int a, int32_t* out) { return data_->train->MicroBatch(a, layout.dp_rank, out); }));
  const size_t per = tokens_.size() / grad_accum;
  // Every micro-batch's cross-entropy in one read after the last backward is
  // enqueued: no host wait between a forward and its backward.
  ce_read_.Reset();
  std::vector<size_t> ce_index(grad_accum);
  for (int a = 0; a < grad_accum; ++a) {
    ASSIGN_OR_RETURN(model::LossParts parts,
                     model_->Forward(*stream_, absl::MakeConstSpan(tokens_).subspan(a * per, per),
                                     micro_batch, &ce_read_));
    ce_index[a] = parts.ce_read;
    // On the last micro-batch a block's gradients are final once its backward
    // ran: its buckets start reducing while earlier blocks still compute.
    model::BlockDoneFn on_block_done;
    if (a == grad_accum - 1) {
      on_block_done = [this](int layer) -> absl::Status {
        for (const parallel::Parameter* p : block_params_[layer]) RETURN_IF_ERROR(grad_sync_->MarkReady(p));
        return absl::OkStatus();
      };
    }
    RETURN_IF_ERROR(model_->Backward(*stream_, loss_scale, on_block_done));
    sums[1] += parts.aux;
    sums[2] += parts.z;
    sums[3] += parts.erc;
    for (size_t i = 0; i < moe_layers.size(); ++i) {
      const model::RoutingPlan& routing = model_->block(moe_layers[i]).moe()->routing();
      double* out = &sums[kParts + i * (E + 1)];
      for (int64_t e = 0; e < E; ++e) out[e] += static_cast<double>(routing.tokens_per_expert[e]);
      out[E] += static_cast<double>(routing.num_dropped());
      double* llep = &sums[llep_base + i * kLlepFields];
      if (const model::LlepRunner* runner = model_->block(moe_layers[i]).moe()->llep()) {
        const model::LlepStats& ls = runner->stats();
        llep[0] += ls.fired ? 1.0 : 0.0;
        llep[1] += ls.imbalance_before;
        llep[2] += ls.imbalance_after;
        llep[3] += static_cast<double>(ls.tokens_moved);
        llep[4] += static_cast<double>(ls.weight_bytes_moved);
      } else {
        llep[1] += 1.0;
        llep[2] += 1.0;
      }
    }
  }
  // Every micro-batch's cross-entropy lands with the gradient norm's read:
  // the copies are enqueued after the last backward, the grad sync and the
  // norm behind them, and the host's first wait (GlobalGradNorm's) passes
  // them. The stream is not drained between the backward and the grad sync.
  RETURN_IF_ERROR(ce_read_.Start(*stream_));
  // Dense gradients summed over DP, expert gradients over EDP (and TP, whose
  // ranks computed different tokens with the same experts).
  {
    trace::Span span(*stream_, "grad sync", trace::Kind::kComm);
    RETURN_IF_ERROR(grad_sync_->Finish());
  }
  StepStats s;
  const int64_t next_step = step_ + 1;
  {
    trace::Span span(*stream_, "grad norm");
    // The global norm (reduced on the device, the step's one host read) is
    // the same on every rank and finite exactly when every gradient is: it
    // gates the update (below).
    ASSIGN_OR_RETURN(s.grad_norm, optim::GlobalGradNorm(model_->parameters(), *groups_));
  }
  RETURN_IF_ERROR(ce_read_.Collect());  // landed before the norm: no wait of its own
  for (int a = 0; a < grad_accum; ++a) sums[0] += ce_read_.values(ce_index[a])[0];
  // TP ranks see the same tokens: sum over DP only.
  ASSIGN_OR_RETURN(sums, SumOverDataParallel(std::move(sums)));

  s.ce = sums[0] / num_micro_batches;
  s.aux = sums[1] / num_micro_batches;
  s.z = sums[2] / num_micro_batches;
  s.erc = sums[3] / num_micro_batches;
  s.loss = s.ce + s.aux + s.z + s.erc;
  if (!std::isfinite(s.loss)) {
    return absl::DataLossError(absl::StrFormat(
        "step %d: the loss is not finite (ce %g, aux %g, z %g); stopping before the update. Lower optim.lr "
        "or set optim.clip_grad",
        next_step, s.ce, s.aux, s.z));
  }
  for (size_t i = 0; i < moe_layers.size(); ++i) {
    MoeLayerStats m;
    m.layer = moe_layers[i];
    const double* in = &sums[kParts + i * (E + 1)];
    for (int64_t e = 0; e < E; ++e) m.tokens_per_expert.push_back(static_cast<int64_t>(std::llround(in[e])));
    m.dropped = static_cast<int64_t>(std::llround(in[E]));
    m.max_over_mean = MaxOverMean(m.tokens_per_expert);
    // Every rank reports its EP group's figures: means over ranks, and the
    // group totals counted once per group (ep ranks each).
    const double* llep = &sums[llep_base + i * kLlepFields];
    m.llep_fired = llep[0] / num_micro_batches;
    m.llep_imbalance_before = llep[1] / num_micro_batches;
    m.llep_imbalance_after = llep[2] / num_micro_batches;
    m.llep_tokens_moved = static_cast<int64_t>(std::llround(llep[3] / layout.ep));
    m.llep_weight_bytes_moved = static_cast<int64_t>(std::llround(llep[4] / layout.ep));
    s.expert_load_max_over_mean = std::max(s.expert_load_max_over_mean, m.max_over_mean);
    s.moe_layers.push_back(std::move(m));
  }

  {
    trace::Span span(*stream_, "optimizer");
    // Only a failing step looks for the parameter to name.
    if (!std::isfinite(s.grad_norm)) {
      ASSIGN_OR_RETURN(std::optional<std::string> bad,
                       optim::FirstNonFiniteGrad(model_->parameters(), *groups_));
      return absl::DataLossError(absl::StrCat(
          "step ", next_step, ": ",
          bad.has_value()
              ? absl::StrCat("the gradient of ", *bad, " is not finite")
              : absl::StrCat("the global gradient norm is ", s.grad_norm, " (its square overflows f32)"),
          "; stopping before the update. Lower optim.lr or set optim.clip_grad"));
    }
    s.lr = schedule_->At(optimizer_->step() + 1);
    // Clipping (optim.clip_grad) scales the gradients as the update reads
    // them. bf16: the step also rounds the updated masters into the compute
    // copies the next forward reads (optim/optimizer.h, "Mixed precision").
    RETURN_IF_ERROR(optimizer_->Step(s.lr, optim::ClipCoefficient(s.grad_norm, config_.optim().clip_grad())));
  }
  // Auxiliary-loss-free balancing: every rank applies the same global load.
  RETURN_IF_ERROR(model_->UpdateExpertBiases(*stream_, [this](std::vector<double>& load) -> absl::Status {
    ASSIGN_OR_RETURN(load, SumOverDataParallel(std::move(load)));
    return absl::OkStatus();
  }));
  // The new biases for the metrics: every layer's in one read, which lands
  // with the step end's wait (no wait of its own).
  bias_read_.Reset();
  std::vector<std::pair<MoeLayerStats*, size_t>> biases;
  for (MoeLayerStats& m : s.moe_layers) {
    model::Router& router = model_->block(m.layer).moe()->router();
    if (router.has_expert_bias()) biases.emplace_back(&m, bias_read_.Add(router.expert_bias().value));
  }
  if (!biases.empty()) RETURN_IF_ERROR(bias_read_.Start(*stream_));
  data_->train->Advance();
  step_ = next_step;

  s.step = step_;
  step_span.reset();
  RETURN_IF_ERROR(profiler_->SyncStepEnd(*stream_));  // the step end's host wait
  if (!biases.empty()) {
    RETURN_IF_ERROR(bias_read_.Collect());
    for (auto& [m, i] : biases)
      m->expert_bias.assign(bias_read_.values(i).begin(), bias_read_.values(i).end());
  }
  s.step_time_s = std::chrono::duration<double>(Clock::now() - start).count();
  RETURN_IF_ERROR(ProfileStep(&s));
  const double tokens = num_micro_batches * micro_batch * config_.model().seq_len();
  s.tokens_per_s = tokens / std::max(s.step_time_s, 1e-9);
  s.mem_peak_bytes = backend_->memory().Total().peak_bytes;
  history_.push_back(s);
  return s;
}

// Every rank's profile of the step, gathered on world (one small collective
// per step) so that rank 0 writes the whole job's breakdown.
absl::Status Trainer::ProfileStep(StepStats* s) {
  RankStepProfile mine;
  profiler_->EndStep(s->step_time_s, backend_->memory(), &mine);
  for (const MoeLayerStats& m : s->moe_layers) profiler_->AddExpertLoad(m.layer, m.tokens_per_expert);
  RETURN_IF_ERROR(profiler_->MaybeWriteTrace());
  const int W = groups_->layout.world;
  const size_t L = mine.a2a_bytes.size();
  std::vector<double> row = {mine.step_time_s, mine.compute_s, mine.exposed_comm_s};
  for (int64_t b : mine.mem_peak_bytes) row.push_back(static_cast<double>(b));
  for (size_t i = 0; i < L; ++i) {
    row.push_back(static_cast<double>(mine.a2a_bytes[i]));
    row.push_back(mine.a2a_time_s[i]);
    for (int64_t b : mine.a2a_peer_bytes[i]) row.push_back(static_cast<double>(b));
  }
  std::vector<double> all(row.size() * W);
  if (W > 1) {
    ASSIGN_OR_RETURN(comm::Work w,
                     groups_->host.world->AllGather(row.data(), all.data(), row.size(), DType::kF64));
    RETURN_IF_ERROR(w.Wait());
  } else {
    all = row;
  }
  if (groups_->layout.rank != 0) return absl::OkStatus();
  for (int r = 0; r < W; ++r) {
    const double* v = &all[static_cast<size_t>(r) * row.size()];
    RankStepProfile p;
    p.step_time_s = *v++;
    p.compute_s = *v++;
    p.exposed_comm_s = *v++;
    for (int c = 0; c < kNumMemoryCategories; ++c) p.mem_peak_bytes.push_back(static_cast<int64_t>(*v++));
    p.a2a_peer_bytes.resize(L);
    for (size_t i = 0; i < L; ++i) {
      p.a2a_bytes.push_back(static_cast<int64_t>(*v++));
      p.a2a_time_s.push_back(*v++);
      for (int q = 0; q < W; ++q) p.a2a_peer_bytes[i].push_back(static_cast<int64_t>(*v++));
    }
    s->ranks.push_back(std::move(p));
  }
  Profiler::StepSummary(s->ranks);
  return absl::OkStatus();
}

absl::StatusOr<std::optional<double>> Trainer::Evaluate() {
  if (data_->valid == nullptr) return std::optional<double>();
  // train.eval_batches global batches of the validation split, each split into
  // grad_accum x dp micro-batches like a training batch: the same sequences on
  // every layout with the same global batch (data/sampler.h).
  trace::Span span(*stream_, "eval");
  const int64_t batches = std::max<int64_t>(1, config_.train().eval_batches());
  const int64_t grad_accum = config_.train().grad_accum();
  const int64_t micro_batch = config_.train().micro_batch();
  double ce = 0;
  const size_t per = tokens_.size() / grad_accum;
  for (int64_t b = 0; b < batches; ++b) {
    RETURN_IF_ERROR(ReadMicroBatches(static_cast<int>(grad_accum), [&](int a, int32_t* out) {
      return data_->valid->EvalMicroBatch(b, a, groups_->layout.dp_rank, out);
    }));
    for (int64_t a = 0; a < grad_accum; ++a) {
      ASSIGN_OR_RETURN(
          model::LossParts parts,
          model_->Forward(*stream_, absl::MakeConstSpan(tokens_).subspan(a * per, per), micro_batch));
      ce += parts.ce;
    }
  }
  ASSIGN_OR_RETURN(std::vector<double> sum, SumOverDataParallel({ce}));
  return sum[0] / (static_cast<double>(batches) * grad_accum * groups_->layout.dp);
}

void Trainer::Log(const StepStats& s) const {
  MOE_LOG_RANK0(INFO) << absl::StrFormat(
      "step %d/%d | loss %.4f (ce %.4f aux %.4f z %.4f) | lr %.3e | grad norm %.3f | %.0f tok/s | %.3f s | "
      "mem peak %s | expert load max/mean %.2f",
      s.step, config_.train().steps(), s.loss, s.ce, s.aux, s.z, s.lr, s.grad_norm, s.tokens_per_s,
      s.step_time_s, Bytes(s.mem_peak_bytes), s.expert_load_max_over_mean);
}

absl::Status Trainer::WriteMetrics(const StepStats& s) {
  if (!metrics_.has_value()) return absl::OkStatus();
  std::string layers = "[";
  for (size_t i = 0; i < s.moe_layers.size(); ++i) {
    const MoeLayerStats& m = s.moe_layers[i];
    JsonLine l;
    l.Add("layer", m.layer).Add("tokens_per_expert", m.tokens_per_expert).Add("dropped", m.dropped);
    l.Add("max_over_mean", m.max_over_mean);
    l.Add("llep_fired", m.llep_fired).Add("llep_imbalance_before", m.llep_imbalance_before);
    l.Add("llep_imbalance_after", m.llep_imbalance_after).Add("llep_tokens_moved", m.llep_tokens_moved);
    l.Add("llep_weight_bytes_moved", m.llep_weight_bytes_moved);
    if (!m.expert_bias.empty()) l.Add("expert_bias", m.expert_bias);
    if (!s.ranks.empty()) {
      // Summed over every rank: bytes sent by dispatch and combine
      // all-to-alls (forward and backward); time: the slowest rank's sum of
      // op durations; the matrix: bytes from world rank (row) to world rank.
      int64_t bytes = 0;
      double time = 0;
      std::string matrix = "[";
      for (size_t r = 0; r < s.ranks.size(); ++r) {
        bytes += s.ranks[r].a2a_bytes[i];
        time = std::max(time, s.ranks[r].a2a_time_s[i]);
        absl::StrAppend(&matrix, r ? "," : "", "[", absl::StrJoin(s.ranks[r].a2a_peer_bytes[i], ","), "]");
      }
      l.Add("a2a_bytes", bytes).Add("a2a_time_s", time).AddRaw("a2a_matrix", matrix + "]");
    }
    absl::StrAppend(&layers, i ? "," : "", l.str());
  }
  layers += "]";
  JsonLine line;
  line.Add("event", "train").Add("step", s.step).Add("loss", s.loss).Add("ce", s.ce).Add("aux", s.aux);
  line.Add("z", s.z);
  if (config_.model().moe().erc_loss_coeff() > 0) line.Add("erc", s.erc);
  line.Add("lr", s.lr).Add("grad_norm", s.grad_norm).Add("tokens_per_s", s.tokens_per_s);
  line.Add("step_time_s", s.step_time_s).Add("mem_peak_bytes", s.mem_peak_bytes);
  line.Add("expert_load_max_over_mean", s.expert_load_max_over_mean).AddRaw("moe_layers", layers);
  if (!s.ranks.empty()) {
    double exposed = 0;
    std::string ranks = "[";
    for (size_t r = 0; r < s.ranks.size(); ++r) {
      const RankStepProfile& p = s.ranks[r];
      exposed = std::max(exposed, p.exposed_comm_s);
      std::string mem = "{";
      for (int c = 0; c < kNumMemoryCategories; ++c) {
        absl::StrAppend(&mem, c ? "," : "", "\"", MemoryCategoryName(static_cast<MemoryCategory>(c)),
                        "\":", p.mem_peak_bytes[c]);
      }
      JsonLine j;
      j.Add("rank", static_cast<int>(r)).Add("step_time_s", p.step_time_s).Add("compute_s", p.compute_s);
      j.Add("exposed_comm_s", p.exposed_comm_s)
          .Add("waiting_s", p.waiting_s)
          .AddRaw("mem_peak_bytes", mem + "}");
      absl::StrAppend(&ranks, r ? "," : "", j.str());
    }
    line.Add("exposed_comm_s", exposed).AddRaw("ranks", ranks + "]");
  }
  return metrics_->Write(line);
}

absl::Status Trainer::Run() {
  const auto& train = config_.train();
  const auto start = Clock::now();
  auto evaluate = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::optional<double> valid, Evaluate());
    if (!valid.has_value()) return absl::OkStatus();
    MOE_LOG_RANK0(INFO) << absl::StrFormat("step %d | validation loss %.4f (ppl %.2f)", step_, *valid,
                                           std::exp(*valid));
    if (metrics_.has_value()) {
      RETURN_IF_ERROR(
          metrics_->Write(JsonLine().Add("event", "eval").Add("step", step_).Add("valid_loss", *valid)));
    }
    return absl::OkStatus();
  };
  const bool checkpoints = !config_.checkpoint().dir().empty();
  const int save_every = config_.checkpoint().save_every();
  RETURN_IF_ERROR(InstallStopSignalHandlers());
  if (checkpoints && train.steps() == 0) {
    RETURN_IF_ERROR(SaveCheckpoint());  // the initial model, to keep, share and inspect
    MOE_LOG_RANK0(INFO) << "saved the initial model as step 0 under " << config_.checkpoint().dir();
  }
  if (train.steps() > 0 && config_.profile().trace() && config_.profile().trace_start() >= train.steps()) {
    MOE_LOG_RANK0(WARNING) << "profile.trace_start = " << config_.profile().trace_start()
                           << " is not below train.steps = " << train.steps() << ": nothing will be traced";
  }
  while (step_ < train.steps()) {
    ASSIGN_OR_RETURN(StepStats s, TrainStep());
    if (s.step % train.log_every() == 0 || s.step == 1 || s.step == train.steps()) Log(s);
    RETURN_IF_ERROR(WriteMetrics(s));
    if (train.eval_every() > 0 && s.step % train.eval_every() == 0 && s.step != train.steps()) {
      RETURN_IF_ERROR(evaluate());
    }
    // Every rank stops at the same step when any rank got SIGTERM/SIGUSR1.
    ASSIGN_OR_RETURN(bool stop, AgreeOnStop(*groups_->host.world));
    if (stop) {
      stopped_by_signal_ = true;
      if (checkpoints) RETURN_IF_ERROR(SaveCheckpoint());
      RETURN_IF_ERROR(checkpointer_->WaitForPendingSave());
      MOE_LOG_RANK0(WARNING) << "stop requested: stopped after step " << step_
                             << (checkpoints ? " and saved a checkpoint"
                                             : " (no checkpoint.dir: nothing saved)");
      return absl::OkStatus();
    }
    if (checkpoints && save_every > 0 && step_ % save_every == 0 && step_ != train.steps()) {
      RETURN_IF_ERROR(SaveCheckpoint());
    }
  }
  RETURN_IF_ERROR(evaluate());
  if (checkpoints && train.steps() > 0) RETURN_IF_ERROR(SaveCheckpoint());
  RETURN_IF_ERROR(checkpointer_->WaitForPendingSave());
  RETURN_IF_ERROR(profiler_->Stop());
  MOE_LOG_RANK0(INFO) << absl::StrFormat("done: %d steps in %.1f s", step_,
                                         std::chrono::duration<double>(Clock::now() - start).count());
  return absl::OkStatus();
}

}  // namespace moe
