// Enqueue before the data arrives: a MoE layer's forward and backward over the
// all-to-all dispatcher (EP 2, 2 overlap chunks) run on a CPU worker stream
// while the communicator wrapper (comm/comm_wrapper.h) delays the first token
// all-to-all by 2 s on every rank. The forward call enqueues every chunk's
// transfer, expert compute, combine and un-permute, and the backward call
// every chunk's transfers, expert backward, the combine weights' gradients and
// the router's backward, each returning while the delayed transfer is still on
// the wire (an event recorded after the returned work is not complete, and the
// calls took well under the delay); the stream then finishes the work, and
// the output, the input gradient and every parameter gradient equal the ones
// computed on the inline stream with no delay, bit for bit.
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

// One layer forward + backward on `stream` with `ep` as the EP group.
struct Pass {
  std::vector<float> y, dx, router_grad, gate_grad, up_grad, down_grad;
  double forward_s = 0, backward_s = 0;                    // the host time of each call (enqueueing)
  bool forward_pending = false, backward_pending = false;  // work left when each returned
};

Pass ForwardBackward(comm::Communicator& ep, Stream& stream) {
  const config::ModelConfig cfg = LayerConfig();
  ShardPlan plan;
  plan.ep_size = ep.size();
  plan.ep_rank = ep.rank();
  MoELayer layer;
  MOE_REQUIRE_OK(layer.Init(Cpu().default_stream(), "model.layers.0.mlp.", cfg, 0.3f, 0.3f, plan, 11,
                            std::make_unique<AllToAllTokenDispatcher>(&ep, nullptr, 4, 2)));
  std::mt19937 rng(3 + ep.rank());
  std::normal_distribution<float> normal;
  std::vector<float> xs(kTokens * cfg.hidden_size()), dys(xs.size());
  for (float& v : xs) v = normal(rng);
  for (float& v : dys) v = normal(rng);
  Tensor x = parallel::testing::HostTensor(xs, Shape{kTokens, cfg.hidden_size()});
  Tensor dy = parallel::testing::HostTensor(dys, Shape{kTokens, cfg.hidden_size()});
  auto pending = [&] {
    std::unique_ptr<Event> after = ValueOrDie(Cpu().CreateEvent());
    MOE_REQUIRE_OK(stream.Record(*after));
    return !after->Query();
  };
  Pass p;
  auto t0 = std::chrono::steady_clock::now();
  Tensor y = ValueOrDie(layer.Forward(stream, x, kTokens));
  p.forward_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  p.forward_pending = pending();
  t0 = std::chrono::steady_clock::now();
  Tensor dx = ValueOrDie(layer.Backward(stream, dy, 0.5f, 0.25f, 1.0f));
  p.backward_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  p.backward_pending = pending();
  MOE_REQUIRE_OK(stream.Synchronize());
  p.y = ToVector(y);
  p.dx = ToVector(dx);
  p.router_grad = ToVector(layer.router().weight().grad);
  p.gate_grad = ToVector(layer.experts().gate_proj().grad);
  p.up_grad = ToVector(layer.experts().up_proj().grad);
  p.down_grad = ToVector(layer.experts().down_proj().grad);
  return p;
}

TEST_CASE("a MoE layer's forward and backward are enqueued before the delayed token all-to-all completes") {
  parallel::ProcessGroups groups = parallel::testing::Groups(1, parallel::testing::World()->size());
  REQUIRE(groups.ep->size() == 2);
  const Pass reference = ForwardBackward(*groups.ep, Cpu().default_stream());

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
  const Pass delayed = ForwardBackward(*ep, *worker);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO("forward enqueue " << delayed.forward_s << " s, backward enqueue " << delayed.backward_s
                          << " s, enqueue + run " << total_s << " s, delay " << kDelayS << " s");
  CHECK(delayed.forward_pending);   // the enqueued work had not run when Forward returned
  CHECK(delayed.backward_pending);  // nor when Backward returned
  // Neither call waited for the transfer (the backward has no host read: the
  // router's backward is ordered on the stream).
  CHECK(delayed.forward_s + delayed.backward_s < 0.5 * kDelayS);
  CHECK(total_s >= 0.9 * kDelayS);  // the delay really held the transfer
  // The same results, bit for bit.
  CHECK(delayed.y == reference.y);
  CHECK(delayed.dx == reference.dx);
  CHECK(delayed.router_grad == reference.router_grad);
  CHECK(delayed.gate_grad == reference.gate_grad);
  CHECK(delayed.up_grad == reference.up_grad);
  CHECK(delayed.down_grad == reference.down_grad);
}

}  // namespace
}  // namespace moe::model
