// ZeRO-1 (optim.shard_state) equals the unsharded optimizer bit for bit over 3
// steps, on every layout of the world (run with 2 and 4 ranks), for AdamW and
// SGD with momentum, with one bucket and with many small all-gather buckets,
// and keeps the bf16 compute copies equal to the updated values rounded;
// and its sharded state round-trips (save, fresh optimizer, load, step).
#include <catch2/catch.hpp>
#include <vector>

#include "mpi_test_util.h"
#include "optim/optimizer.h"
#include "runtime/core/config.h"
#include "runtime/core/config.pb.h"

namespace moe::optim {
namespace {

using testing::BuildModel;
using testing::MakeGroups;
using testing::TestModel;
using testing::ToVector;

struct TpEp {
  int tp, ep;
};

std::vector<TpEp> LayoutsOf(int world) {
  if (world == 2) return {{1, 1}, {1, 2}, {2, 1}};
  return {{1, 1}, {1, 2}, {1, 4}, {2, 1}, {2, 2}};
}

void SetGrads(TestModel& m, int step) {
  for (auto& p : m.owned) testing::FillShard(*p, p->grad, 10 + step);
}

double LrOf(int step) { return 1e-2 * (step + 1); }

std::vector<OptimizerOptions> OptionsToTry() {
  std::vector<OptimizerOptions> out;
  OptimizerOptions adam;
  adam.type = OptimizerType::kAdamW;
  adam.weight_decay = 0.1;
  out.push_back(adam);
  adam.gather_bucket_elements = 5;  // many buckets, cut everywhere
  out.push_back(adam);
  OptimizerOptions sgd;
  sgd.type = OptimizerType::kSgd;
  sgd.momentum = 0.9;
  sgd.weight_decay = 0.05;
  sgd.gather_bucket_elements = 13;
  out.push_back(sgd);
  return out;
}

int WorldSize() {
  parallel::ProcessGroups g = MakeGroups(1, 1);
  return g.layout.world;
}

TEST_CASE("ZeRO-1 equals the unsharded optimizer bitwise") {
  for (const TpEp& layout : LayoutsOf(WorldSize())) {
    parallel::ProcessGroups groups = MakeGroups(layout.tp, layout.ep);
    for (OptimizerOptions options : OptionsToTry()) {
      INFO("tp " << layout.tp << " ep " << layout.ep << " rank " << groups.layout.rank << " type "
                 << static_cast<int>(options.type) << " bucket " << options.gather_bucket_elements);
      TestModel plain, zero;
      BuildModel(plain, groups.layout);
      BuildModel(zero, groups.layout);
      // bf16 compute copies on both (train.precision bf16): the step rounds
      // every updated element into them, the gathered ones included.
      for (auto& p : plain.owned) testing::AddComputeCopy(*p);
      for (auto& p : zero.owned) testing::AddComputeCopy(*p);
      options.shard_state = false;
      auto opt_plain = Optimizer::Create(options, plain.list, &groups);
      REQUIRE(opt_plain.ok());
      options.shard_state = true;
      auto opt_zero = Optimizer::Create(options, zero.list, &groups);
      REQUIRE(opt_zero.ok());

      // The owned slices tile each group's index space: the owned element
      // counts of dense (expert) parameters sum over DP (EDP) to the local numel.
      double owned[2] = {0, 0};
      for (const ParamState& s : (*opt_zero)->states()) {
        owned[s.param->kind == parallel::ParamKind::kExpert] += static_cast<double>(s.end - s.begin);
      }
      for (int e = 0; e < 2; ++e) {
        auto w =
            groups.ReduceGroup(e == 1).AllReduce(&owned[e], &owned[e], 1, DType::kF64, comm::ReduceOp::kSum);
        REQUIRE(w.ok());
        REQUIRE(w->Wait().ok());
      }
      if (options.type == OptimizerType::kAdamW) {
        CHECK(owned[0] == static_cast<double>(plain.list.LocalNumel(parallel::ParamKind::kDense)));
        CHECK(owned[1] == static_cast<double>(plain.list.LocalNumel(parallel::ParamKind::kExpert)));
        if (groups.layout.dp > 1) CHECK((*opt_zero)->StateBytes() < (*opt_plain)->StateBytes());
      }

      for (int step = 0; step < 3; ++step) {
        SetGrads(plain, step);
        SetGrads(zero, step);
        REQUIRE((*opt_plain)->Step(LrOf(step)).ok());
        REQUIRE((*opt_zero)->Step(LrOf(step)).ok());
        for (size_t i = 0; i < plain.owned.size(); ++i) {
          INFO("step " << step + 1 << " parameter " << plain.owned[i]->name);
          CHECK(ToVector(plain.owned[i]->value) == ToVector(zero.owned[i]->value));
          CHECK(testing::ComputeCopyMismatches(*plain.owned[i]).empty());
          CHECK(testing::ComputeCopyMismatches(*zero.owned[i]).empty());
        }
      }
      // The sharded state is the matching slice of the unsharded one.
      for (const ParamState& s : (*opt_zero)->states()) {
        const ParamState* full = nullptr;
        for (const ParamState& f : (*opt_plain)->states()) {
          if (f.param->name == s.param->name) full = &f;
        }
        REQUIRE(full != nullptr);
        for (const auto& [name, t] : s.tensors) {
          const std::vector<float> whole = ToVector(*full->Find(name));
          CHECK(ToVector(t) == std::vector<float>(whole.begin() + s.begin, whole.begin() + s.end));
        }
      }
    }
  }
}

TEST_CASE("ZeRO-1 state save and load round trip") {
  for (const TpEp& layout : LayoutsOf(WorldSize())) {
    parallel::ProcessGroups groups = MakeGroups(layout.tp, layout.ep);
    OptimizerOptions options;
    options.shard_state = true;
    options.weight_decay = 0.1;
    TestModel a, b;
    BuildModel(a, groups.layout);
    BuildModel(b, groups.layout);
    auto opt_a = Optimizer::Create(options, a.list, &groups);
    REQUIRE(opt_a.ok());
    for (int step = 0; step < 2; ++step) {
      SetGrads(a, step);
      REQUIRE((*opt_a)->Step(LrOf(step)).ok());
    }
    for (size_t i = 0; i < a.owned.size(); ++i)
      testing::SetValues(b.owned[i]->value, ToVector(a.owned[i]->value));
    auto opt_b = Optimizer::Create(options, b.list, &groups);
    REQUIRE(opt_b.ok());
    REQUIRE((*opt_b)->states().size() == (*opt_a)->states().size());
    for (size_t k = 0; k < (*opt_a)->states().size(); ++k) {
      const ParamState& sa = (*opt_a)->states()[k];
      const ParamState& sb = (*opt_b)->states()[k];
      CHECK(sa.param->name == sb.param->name);
      CHECK(sa.begin == sb.begin);
      CHECK(sa.end == sb.end);
      for (const auto& [name, t] : sa.tensors) {
        Tensor copy = testing::HostTensor(t.shape(), ToVector(t), MemoryCategory::kOther);
        REQUIRE((*opt_b)->LoadState(sa.param->name, name, copy).ok());
      }
    }
    (*opt_b)->set_step((*opt_a)->step());
    SetGrads(a, 2);
    SetGrads(b, 2);
    REQUIRE((*opt_a)->Step(LrOf(2)).ok());
    REQUIRE((*opt_b)->Step(LrOf(2)).ok());
    for (size_t i = 0; i < a.owned.size(); ++i) {
      INFO("tp " << layout.tp << " ep " << layout.ep << " parameter " << a.owned[i]->name);
      CHECK(ToVector(a.owned[i]->value) == ToVector(b.owned[i]->value));
    }
  }
}

}  // namespace
}  // namespace moe::optim

namespace moe::optim {
namespace {

TEST_CASE("CreateOptimizer from the job config") {
  parallel::ProcessGroups groups = MakeGroups(1, 1);
  TestModel m;
  BuildModel(m, groups.layout);
  config::JobConfig job;
  job.mutable_optim()->set_type("sgd");
  job.mutable_optim()->set_momentum(0.8);
  job.mutable_optim()->set_shard_state(true);
  job.mutable_optim()->set_weight_decay(0.25);
  ApplyDefaults(groups.layout.world, &job);
  auto opt = CreateOptimizer(job.optim(), m.list, groups);
  REQUIRE(opt.ok());
  CHECK(std::string((*opt)->type_name()) == "sgd");
  CHECK((*opt)->sharded());
  CHECK((*opt)->state_names() == std::vector<std::string>{"momentum_buffer"});
  CHECK((*opt)->WeightDecayOf(*m.list.Find("norm")) == 0.0);
  CHECK((*opt)->WeightDecayOf(*m.list.Find("col")) == 0.25);
  job.mutable_optim()->set_decay_norms_and_embeddings(true);
  opt = CreateOptimizer(job.optim(), m.list, groups);
  REQUIRE(opt.ok());
  CHECK((*opt)->WeightDecayOf(*m.list.Find("norm")) == 0.25);
  CHECK((*opt)->WeightDecayOf(*m.list.Find("embed")) == 0.25);
  job.mutable_optim()->set_beta1(1.0);
  job.mutable_optim()->set_type("adamw");
  auto bad = CreateOptimizer(job.optim(), m.list, groups);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("optim.beta1 = 1"));
}

}  // namespace
}  // namespace moe::optim
