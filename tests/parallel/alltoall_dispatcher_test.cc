// The all-to-all token dispatcher under mpirun, for several (tp, ep) layouts:
// dispatch -> experts -> combine against a host reference of docs/model.md's MoE
// sum (values, input gradients, combine-weight gradients), with an identity
// expert (dispatch then combine is the identity), skewed routing, a zero-token
// expert, capacity drops, uneven TP slices, empty chunks, and both drivers
// (TokenDispatcher interface and pipelined chunks 1 and 3).
#include "model/alltoall_dispatcher.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "comm/mpi_env.h"
#include "model/router.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::model {
namespace {

using parallel::ProcessGroups;
using parallel::testing::Cpu;
using parallel::testing::HostTensor;
using parallel::testing::ToVector;
using parallel::testing::ValueOrDie;

constexpr int64_t kTokens = 10, kHidden = 4, kExperts = 4;
constexpr int kTopK = 2;

struct Batch {
  std::vector<float> x, dy;
  RoutingPlan plan;
};

// The micro-batch of data-parallel rank `dp_rank` (the same on its TP ranks):
// 60% of first slots to expert 0, expert E-1 never chosen.
Batch MakeBatch(int dp_rank, double capacity_factor) {
  std::mt19937 rng(77 + dp_rank);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> uni;
  Batch b;
  b.x.resize(kTokens * kHidden);
  b.dy.resize(kTokens * kHidden);
  for (float& v : b.x) v = normal(rng);
  for (float& v : b.dy) v = normal(rng);
  std::vector<double> probs(kTokens * kExperts);
  std::vector<int32_t> selection(kTokens * kTopK);
  for (int64_t t = 0; t < kTokens; ++t) {
    double sum = 0;
    for (int64_t e = 0; e < kExperts; ++e) sum += probs[t * kExperts + e] = std::exp(normal(rng));
    for (int64_t e = 0; e < kExperts; ++e) probs[t * kExperts + e] /= sum;
    const int32_t first = uni(rng) < 0.6 ? 0 : static_cast<int32_t>(rng() % (kExperts - 1));
    int32_t second = static_cast<int32_t>(rng() % (kExperts - 1));
    if (second == first) second = (first + 1) % (kExperts - 1);
    selection[t * kTopK] = first;
    selection[t * kTopK + 1] = second;
  }
  b.plan = ComputeRoutingPlan(probs, kTokens, kExperts, kTopK, /*norm_topk_prob=*/true, capacity_factor,
                              /*drop_by_position=*/false, selection);
  return b;
}

// Expert e: y = x W_e^T, W_e [d, d]; identity when `identity`.
std::vector<float> ExpertWeights(bool identity) {
  std::vector<float> w(kExperts * kHidden * kHidden);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int64_t e = 0; e < kExperts; ++e)
    for (int64_t i = 0; i < kHidden; ++i)
      for (int64_t j = 0; j < kHidden; ++j)
        w[(e * kHidden + i) * kHidden + j] = identity ? (i == j ? 1.f : 0.f) : normal(rng);
  return w;
}

struct Reference {
  std::vector<double> y, dx, dweights;
};

Reference Compute(const Batch& b, const std::vector<float>& w) {
  Reference r;
  r.y.assign(kTokens * kHidden, 0);
  r.dx.assign(kTokens * kHidden, 0);
  r.dweights.assign(kTokens * kTopK, 0);
  for (int64_t a = 0; a < kTokens * kTopK; ++a) {
    if (!b.plan.kept[a]) continue;
    const int64_t t = a / kTopK, e = b.plan.experts[a];
    const double g = b.plan.weights[a];
    for (int64_t i = 0; i < kHidden; ++i) {
      double out = 0;
      for (int64_t j = 0; j < kHidden; ++j) out += w[(e * kHidden + i) * kHidden + j] * b.x[t * kHidden + j];
      r.y[t * kHidden + i] += g * out;
      r.dweights[a] += b.dy[t * kHidden + i] * out;
      for (int64_t j = 0; j < kHidden; ++j)
        r.dx[t * kHidden + j] += g * w[(e * kHidden + i) * kHidden + j] * b.dy[t * kHidden + i];
    }
  }
  return r;
}

void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, const char* what) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO(what << " element " << i << " got " << got[i] << " want " << want[i]);
    REQUIRE(std::abs(got[i] - want[i]) <= 1e-5 * (1 + std::abs(want[i])));
  }
}

void Run(int tp, int ep, double capacity_factor, bool identity) {
  ProcessGroups g = parallel::testing::Groups(tp, ep);
  Stream& stream = Cpu().default_stream();
  const Batch batch = MakeBatch(g.layout.dp_rank, capacity_factor);
  const std::vector<float> w = ExpertWeights(identity);
  const Reference ref = Compute(batch, w);
  if (capacity_factor > 0) REQUIRE(batch.plan.num_dropped() > 0);
  REQUIRE(batch.plan.tokens_per_expert[kExperts - 1] == 0);

  for (int chunks : {0, 1, 3}) {  // 0: the TokenDispatcher interface
    INFO("tp " << tp << " ep " << ep << " capacity " << capacity_factor << " chunks " << chunks);
    AllToAllTokenDispatcher d(g.ep.get(), tp > 1 ? g.tp.get() : nullptr, kExperts, chunks == 0 ? 1 : chunks);
    const int64_t eb = d.expert_begin(), ee = d.expert_end();
    REQUIRE(eb == kExperts * g.layout.ep_rank / ep);
    Tensor wl =
        HostTensor(std::vector<float>(w.begin() + eb * kHidden * kHidden, w.begin() + ee * kHidden * kHidden),
                   Shape{ee - eb, kHidden, kHidden});
    auto forward = [&](int, const Tensor& rows, absl::Span<const int64_t> offsets) -> absl::StatusOr<Tensor> {
      ASSIGN_OR_RETURN(Tensor out,
                       Tensor::Empty(Cpu(), rows.shape(), DType::kF32, MemoryCategory::kActivations));
      if (rows.size(0) > 0) RETURN_IF_ERROR(ops::GroupedGemm(stream, rows, wl, true, out, offsets));
      return out;
    };
    auto backward = [&](int, const Tensor& rows,
                        absl::Span<const int64_t> offsets) -> absl::StatusOr<Tensor> {
      ASSIGN_OR_RETURN(Tensor out,
                       Tensor::Empty(Cpu(), rows.shape(), DType::kF32, MemoryCategory::kActivations));
      if (rows.size(0) > 0) RETURN_IF_ERROR(ops::GroupedGemm(stream, rows, wl, false, out, offsets));
      return out;
    };
    Tensor x = HostTensor(batch.x, Shape{kTokens, kHidden});
    Tensor dy = HostTensor(batch.dy, Shape{kTokens, kHidden});
    // The dispatcher overwrites dx, never reads it: it starts as NaN.
    Tensor dx = HostTensor(std::vector<float>(kTokens * kHidden, std::numeric_limits<float>::quiet_NaN()),
                           Shape{kTokens, kHidden});
    Tensor dweights;  // f32 [T * k] on the device
    Tensor y;
    if (chunks == 0) {
      ExpertInput in = ValueOrDie(d.Dispatch(stream, x, batch.plan));
      REQUIRE(static_cast<int64_t>(in.offsets.size()) == ee - eb + 1);
      Tensor out = ValueOrDie(forward(0, in.tokens, in.offsets));
      y = ValueOrDie(d.Combine(stream, out));
      Tensor d_out = ValueOrDie(d.CombineBackward(stream, dy, &dweights));
      Tensor d_in = ValueOrDie(backward(0, d_out, in.offsets));
      MOE_REQUIRE_OK(d.DispatchBackward(stream, d_in, dx));
    } else {
      // The pipelined path passes offsets over all experts; only the local ones have rows.
      auto local = [&](const auto& fn) {
        return [&, fn](int c, const Tensor& rows, absl::Span<const int64_t> all) -> absl::StatusOr<Tensor> {
          REQUIRE(static_cast<int64_t>(all.size()) == kExperts + 1);
          REQUIRE(all[eb] == 0);
          REQUIRE(all[ee] == rows.size(0));
          return fn(c, rows, all.subspan(eb, ee - eb + 1));
        };
      };
      y = ValueOrDie(d.ForwardPipelined(stream, x, batch.plan, local(forward), nullptr));
      MOE_REQUIRE_OK(d.BackwardPipelined(stream, dy, local(backward), &dweights, dx));
    }
    ExpectClose(ToVector(y), ref.y, "y");
    ExpectClose(ToVector(dx), ref.dx, "dx");
    ExpectClose(ToVector(dweights), ref.dweights, "dweights");
    if (identity && capacity_factor <= 0) {
      // Dispatch then combine is the identity (weights sum to 1 per token).
      ExpectClose(ToVector(y), std::vector<double>(batch.x.begin(), batch.x.end()), "identity y");
      ExpectClose(ToVector(dx), std::vector<double>(batch.dy.begin(), batch.dy.end()), "identity dx");
    }
  }
}

std::vector<std::pair<int, int>> Layouts() {
  const int world = comm::MpiEnv::world_size();
  std::vector<std::pair<int, int>> l = {{1, world}, {world, 1}};
  if (world == 4) {
    l.push_back({1, 2});
    l.push_back({2, 2});
    l.push_back({2, 1});
  }
  return l;
}

TEST_CASE("dispatch then combine is the identity (values and gradients)", "[dispatcher]") {
  for (auto [tp, ep] : Layouts()) Run(tp, ep, 0.0, true);
}

TEST_CASE("dispatcher matches the MoE sum, dropless and with capacity drops", "[dispatcher]") {
  for (auto [tp, ep] : Layouts()) {
    Run(tp, ep, 0.0, false);
    Run(tp, ep, 1.0, false);
  }
}

}  // namespace
}  // namespace moe::model
