// Host waits per training step: every place a TrainStep blocks the host on
// device work or on a control-plane collective (counted by HostSyncCount,
// runtime/core/backend.h; tests/runtime/host_sync_test.cc pins the demo's
// number). Everything else on the step's path -- token exchange chunks, TP
// collectives, grad-sync buckets, LLEP weight moves and gradient returns,
// clipping, the optimizer and the ZeRO-1 all-gathers, the combine weights'
// gradients and the router's backward (model/router.h) -- is ordered on
// streams and never waits on the host, on CUDA too: device copies of host
// tables go through Tensor::FromHostOn (Stream::CopyFromHost), zero fills
// through Tensor::ZerosOn (tests/runtime/host_sync_test.cc runs the step on
// the emulated CUDA backend as well).
//
// Per micro-batch and MoE layer:
//   routing           1   one read of the router's choice (experts and their
//                         scores, chosen on the stream by ops::RouterScores)
//                         and the losses' sums, for the host's plan (weights,
//                         counts, capacity; model/router.h), with the shared
//                         expert's gate logits (shared_expert_gate) in the same
//                         wait; the shared expert is enqueued before it
//                         (model/moe_layer.h)
//   llep_counts       1   LLEP's per-chunk, per-expert count gather on the host EP
//                         group (the planner runs on the host;
//                         parallel/llep_exchange.h), llep.enabled with EP > 1; every
//                         rank derives its receive counts from it, fired or not
//                         (parallel::ChunkReceiveCounts), so it replaces the count
//                         exchange
//   erc               1   the coupling loss's activation norms: squared on the
//                         device, summed over the expert TP group and gathered over
//                         EP on the stream, read once (model/erc_loss.h; its router
//                         rows come with the routing read, its backward waits for
//                         nothing; it used to read the activations, then their TP
//                         sum, then their EP gather: up to 3); erc_loss_coeff > 0
//   count_exchange    1   the count table that sizes the all-to-all
//                         (parallel/token_exchange.h, ExchangePlan::Create), EP > 1
//                         without LLEP (with it, LLEP's gather gives the counts)
// Per step:
//   data              1   the ranks agree that every micro-batch of the step was
//                         read (Trainer::ReadMicroBatches, on the host world;
//                         world > 1): a file truncated under the job stops every
//                         rank before the step's first collective
//   losses            0   every micro-batch's cross-entropy scalar in one read
//                         (Model::Forward's ce_read), enqueued after the last
//                         backward and taken after the gradient norm's wait, which
//                         passes it (HostReadback::Collect); it used to be one wait
//                         per micro-batch, between its forward and its backward,
//                         then one per step that drained the backward before the
//                         grad sync and the norm were enqueued
//   metrics           1   the loss and load sums over the host DP group (DP > 1)
//   grad_norm         1   the clipping norm, reduced on the device; the one small
//                         read that also gates the update (optim/clip.h)
//   bias_update       1   the global load sum over DP (DP > 1); the update itself
//                         is an add on the stream (model/router.h) and every MoE
//                         layer's new bias for the metrics is read in one read taken
//                         after the step end's wait; expert_bias_update_rate > 0
//   step_end          1   the step's end (Profiler::SyncStepEnd: Stream::Synchronize): step
//                         time, memory, and the reference time of the spans' events
//   profile           1   every rank's step profile gathered on the host world (world > 1)
#ifndef MOE_RUNTIME_HOST_SYNCS_H_
#define MOE_RUNTIME_HOST_SYNCS_H_

#include <string>

#include "runtime/core/config.h"

namespace moe {

struct HostSyncBudget {
  int micro_batches = 1, moe_layers = 0;
  int per_moe_layer = 0;  // routing read, LLEP counts or count exchange, coupling loss
  int per_step = 0;       // data, metrics, grad norm, bias load sum, step end, profile
  int total() const { return micro_batches * moe_layers * per_moe_layer + per_step; }
  std::string ToString() const;
};

// The host waits of one TrainStep of `config` (after ApplyDefaults) on
// `world` ranks, per the table above.
HostSyncBudget HostSyncsPerStep(const JobConfig& config, int world);

}  // namespace moe

#endif  // MOE_RUNTIME_HOST_SYNCS_H_
