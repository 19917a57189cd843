// Enqueue before the data arrives: a MoE layer's forward over the all-to-all
// dispatcher (EP 2, 2 overlap chunks) runs on a CPU worker stream while the
// communicator wrapper (comm/comm_wrapper.h) delays the first token
// all-to-all by 2 s on every rank. The forward call enqueues every chunk's
// transfer, expert compute, combine and un-permute and returns while the
// delayed transfer is still on the wire (an event recorded after the returned
// work is not complete, and the call took well under the delay); the stream
// then finishes the work, and the output equals the one computed on the
// inline stream with no delay, bit for bit.
//
// The backward cannot return early today: the router's backward runs on the
// host and reads the combine-weight gradients after the last chunk (one host
// wait, runtime/host_syncs.h).
#include <catch2/catch.hpp>
#include <chrono>
#include <memory>
#include <random>
#include <vector>

#include "comm/comm_wrapper.h"
#include "model/alltoall_dispatcher.h"
#include "model/moe_layer.h"
#include "runtime/core/config.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::model {
namespace {

using parallel::testing::Cpu;
using parallel::testing::ToVector;
using parallel::testing::ValueOrDie;

constexpr double kDelayS = 2.0;
constexpr int64_t kTokens = 64;

config::ModelConfig LayerConfig() {
  JobConfig job;
  auto* m = job.mutable_model();
  m->set_hidden_size(16);
  m->set_num_layers(1);
  m->set_num_heads(4);
  m->set_seq_len(kTokens);
  auto* moe = m->mutable_moe();
  moe->set_num_experts(4);
  moe->set_top_k(2);
  moe->set_expert_ffn_hidden_size(24);
  moe->set_capacity_factor(0.0);
  ApplyDefaults(1, &job);
  return job.model();
}

// y of one layer forward on `stream` with `ep` as the EP group.
std::vector<float> Forward(comm::Communicator& ep, Stream& stream, double* enqueue_s, bool* pending) {
  const config::ModelConfig cfg = LayerConfig();
  ShardPlan plan;
  plan.ep_size = ep.size();
  plan.ep_rank = ep.rank();
  MoELayer layer;
  MOE_REQUIRE_OK(layer.Init(Cpu().default_stream(), "model.layers.0.mlp.", cfg, 0.3f, 0.3f, plan, 11,
                            std::make_unique<AllToAllTokenDispatcher>(&ep, nullptr, 4, 2)));
  std::mt19937 rng(3 + ep.rank());
  std::normal_distribution<float> normal;
  std::vector<float> xs(kTokens * cfg.hidden_size());
  for (float& v : xs) v = normal(rng);
  Tensor x = parallel::testing::HostTensor(xs, Shape{kTokens, cfg.hidden_size()});
  const auto t0 = std::chrono::steady_clock::now();
  Tensor y = ValueOrDie(layer.Forward(stream, x, kTokens));
  *enqueue_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::unique_ptr<Event> after = ValueOrDie(Cpu().CreateEvent());
  MOE_REQUIRE_OK(stream.Record(*after));
  *pending = !after->Query();
  MOE_REQUIRE_OK(stream.Synchronize());
  return ToVector(y);
}

TEST_CASE("a MoE layer's forward is enqueued before the delayed token all-to-all completes") {
  parallel::ProcessGroups groups = parallel::testing::Groups(1, parallel::testing::World()->size());
  REQUIRE(groups.ep->size() == 2);
  double enqueue_s = 0;
  bool pending = false;
  const std::vector<float> reference = Forward(*groups.ep, Cpu().default_stream(), &enqueue_s, &pending);

  // Sequence 0 on the EP group is the count exchange (AllToAll); 1 is the
  // first chunk's token AllToAllV.
  comm::WrapperOptions options;
  comm::FaultSpec delay;
  delay.action = comm::FaultSpec::Action::kDelay;
  delay.kind = comm::OpKind::kAllToAllV;
  delay.sequence = 1;
  delay.delay_s = kDelayS;
  options.faults.push_back(delay);
  auto ep = comm::WrapCommunicator(ValueOrDie(groups.ep->Split(0, groups.ep->rank(), "ep_delayed")), options);
  std::unique_ptr<Stream> worker = ValueOrDie(Cpu().CreateStream(StreamMode::kWorker));
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<float> delayed = Forward(*ep, *worker, &enqueue_s, &pending);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO("enqueue " << enqueue_s << " s, enqueue + run " << total_s << " s, delay " << kDelayS << " s");
  CHECK(pending);                    // the enqueued work had not run when Forward returned
  CHECK(enqueue_s < 0.5 * kDelayS);  // Forward did not wait for the transfer
  CHECK(total_s >= 0.9 * kDelayS);   // the delay really held the transfer
  CHECK(delayed == reference);       // the same results, bit for bit
}

}  // namespace
}  // namespace moe::model
