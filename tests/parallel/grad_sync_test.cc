// GradSync under mpirun: dense grads summed over DP only, expert grads over the
// ranks holding the same experts only (EDP, and TP when experts are replicated
// over TP), for several layouts and bucket sizes; buckets launched as they
// fill, the rest at Finish; bad calls refused.
#include "parallel/grad_sync.h"

#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "comm/mpi_env.h"
#include "parallel/layout.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::parallel {
namespace {

using testing::Cpu;
using testing::ToVector;
using testing::ValueOrDie;

constexpr int64_t kExperts = 4;

// Grad element i of parameter `index` on world rank r: distinct per rank so a
// sum over a wrong group gives a different number (small integers, exact).
float GradValue(int r, int index, int64_t i) { return static_cast<float>((1 << r) * (1 + (i + index) % 5)); }

struct Model {
  std::vector<std::unique_ptr<Parameter>> owned;
  ParameterList list;
};

// A toy model: per layer a dense norm [6], a dense router [kExperts, 3] and an
// expert weight [kExperts, 2, 3] of which this EP rank holds E / ep experts.
Model MakeModel(const RankLayout& l, int layers) {
  Model m;
  Stream& stream = Cpu().default_stream();
  int index = 0;
  for (int layer = 0; layer < layers; ++layer) {
    for (int kind = 0; kind < 3; ++kind) {
      auto p = std::make_unique<Parameter>();
      const std::string prefix = "model.layers." + std::to_string(layer) + ".";
      if (kind == 0) {
        p->name = prefix + "input_layernorm.weight";
        p->global_shape = Shape{6};
      } else if (kind == 1) {
        p->name = prefix + "mlp.router.weight";
        p->global_shape = Shape{kExperts, 3};
      } else {
        p->name = prefix + "mlp.experts.gate_proj";
        p->global_shape = Shape{kExperts, 2, 3};
        p->kind = ParamKind::kExpert;
      }
      p->shard = FullShard(p->kind, p->global_shape);
      if (p->kind == ParamKind::kExpert) {
        p->shard.expert_begin = kExperts * l.ep_rank / l.ep;
        p->shard.expert_end = kExperts * (l.ep_rank + 1) / l.ep;
      }
      const Shape local = LocalShape(p->global_shape, p->shard);
      p->value = ValueOrDie(Tensor::Zeros(Cpu(), local, DType::kF32, MemoryCategory::kParameters));
      std::vector<float> g(local.numel());
      for (int64_t i = 0; i < local.numel(); ++i) g[i] = GradValue(l.rank, index, i);
      p->grad = testing::HostTensor(g, local);
      MOE_REQUIRE_OK(m.list.Add(p.get()));
      m.owned.push_back(std::move(p));
      ++index;
    }
  }
  (void)stream;
  return m;
}

void CheckSums(const Model& m, int world, int tp, int ep, const RankLayout& me) {
  for (size_t index = 0; index < m.list.size(); ++index) {
    const Parameter& p = *m.list[index];
    std::vector<float> got = ToVector(p.grad);
    // The world ranks whose grads must be in this sum.
    std::vector<int> members;
    for (int r = 0; r < world; ++r) {
      RankLayout l = ValueOrDie(ComputeLayout(world, tp, ep, r));
      const bool same =
          p.kind == ParamKind::kExpert ? l.ep_rank == me.ep_rank : l.tp_rank == me.tp_rank;  // DP group
      if (same) members.push_back(r);
    }
    for (int64_t i = 0; i < p.grad.numel(); ++i) {
      float want = 0;
      for (int r : members) want += GradValue(r, static_cast<int>(index), i);
      INFO(p.name << " element " << i);
      REQUIRE(got[i] == want);
    }
  }
}

void Run(int tp, int ep, double bucket_mb, bool mark_all) {
  const int world = comm::MpiEnv::world_size();
  ProcessGroups groups = testing::Groups(tp, ep);
  Model m = MakeModel(groups.layout, 3);
  GradSyncOptions options;
  options.bucket_mb = bucket_mb;
  auto sync = ValueOrDie(GradSync::Create(groups, m.list, Cpu().default_stream(), options));
  // Bucket shape: reverse registration order, one group per bucket.
  for (const auto& b : sync->buckets()) {
    REQUIRE(!b.names.empty());
    const bool expert = b.names[0].find("experts") != std::string::npos;
    for (const auto& n : b.names) REQUIRE((n.find("experts") != std::string::npos) == expert);
  }
  if (bucket_mb <= 0) REQUIRE(sync->buckets().size() == m.list.size());
  if (bucket_mb >= 1) REQUIRE(sync->buckets().size() == 2);
  // Two steps: the second proves Finish reset the readiness.
  for (int step = 0; step < 2; ++step) {
    if (step == 1) {
      for (size_t index = 0; index < m.list.size(); ++index) {
        const Parameter& p = *m.list[index];
        std::vector<float> g(p.grad.numel());
        for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] = GradValue(groups.layout.rank, index, i);
        std::memcpy(p.grad.data<float>(), g.data(), g.size() * sizeof(float));
      }
    }
    // Backward order: last layer first; optionally leave the first layer unmarked.
    const size_t stop = mark_all ? 0 : 3;
    for (size_t i = m.list.size(); i > stop; --i) {
      MOE_REQUIRE_OK(sync->MarkReady(m.list[i - 1]));
      // With one parameter per bucket each is launched as soon as it is marked.
      if (bucket_mb <= 0) REQUIRE(sync->launched_buckets() == static_cast<int>(m.list.size() - i + 1));
    }
    if (!mark_all) REQUIRE(sync->launched_buckets() < static_cast<int>(sync->buckets().size()));
    MOE_REQUIRE_OK(sync->Finish());
    CheckSums(m, world, tp, ep, groups.layout);
  }
  // Marking twice in a step is refused.
  MOE_REQUIRE_OK(sync->MarkReady(m.list[0]));
  REQUIRE_FALSE(sync->MarkReady(m.list[0]).ok());
  Parameter stranger;
  REQUIRE_FALSE(sync->MarkReady(&stranger).ok());
  MOE_REQUIRE_OK(sync->Finish());
}

TEST_CASE("dense grads over DP, expert grads over EDP (tp 1)", "[grad_sync]") {
  const int world = comm::MpiEnv::world_size();
  for (int ep : {1, 2, world}) {
    if (world % ep != 0) continue;
    for (double mb : {0.0, 0.0001, 8.0}) {
      INFO("ep " << ep << " bucket_mb " << mb);
      Run(1, ep, mb, true);
      Run(1, ep, mb, false);
    }
  }
}

TEST_CASE("with TP, replicated expert grads also summed over TP", "[grad_sync]") {
  const int world = comm::MpiEnv::world_size();
  if (world % 2 != 0) return;
  for (int ep : {1, world / 2}) {
    INFO("ep " << ep);
    Run(2, ep, 0.0001, true);
    Run(2, ep, 8.0, false);
  }
}

}  // namespace
}  // namespace moe::parallel
