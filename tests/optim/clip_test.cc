// Global gradient-norm clipping on 4 ranks under every layout of world 4:
// the norm equals the one computed on one rank from the full tensors, and the
// non-finite gradient check names the same first parameter on every rank.
#include "optim/clip.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "mpi_test_util.h"

namespace moe::optim {
namespace {

using testing::BuildModel;
using testing::GlobalValue;
using testing::MakeGroups;
using testing::TestModel;
using testing::ToVector;

constexpr int kGradSalt = 7;

// The norm of the full (global) gradients, without communication.
double ReferenceNorm(const TestModel& m) {
  double sum = 0;
  for (const auto& p : m.owned) {
    for (int64_t i = 0; i < p->global_shape.numel(); ++i) {
      const double g = GlobalValue(p->name, i, kGradSalt);
      sum += g * g;
    }
  }
  return std::sqrt(sum);
}

struct TpEp {
  int tp, ep;
};
const TpEp kLayouts[] = {{1, 1}, {1, 2}, {1, 4}, {2, 1}, {2, 2}};

TEST_CASE("Clipped norm equals the single-rank norm under every layout of world 4") {
  for (const TpEp& layout : kLayouts) {
    parallel::ProcessGroups groups = MakeGroups(layout.tp, layout.ep);
    REQUIRE(groups.layout.world == 4);
    INFO("tp " << layout.tp << " ep " << layout.ep << " rank " << groups.layout.rank);
    TestModel m;
    BuildModel(m, groups.layout);
    for (auto& p : m.owned) testing::FillShard(*p, p->grad, kGradSalt);
    const double ref = ReferenceNorm(m);

    auto norm = GlobalGradNorm(m.list, groups);
    REQUIRE(norm.ok());
    CHECK(std::abs(*norm - ref) <= 1e-6 * ref);

    // Off, or above the norm: the gradients stay as they are (bitwise).
    std::vector<std::vector<float>> before;
    for (auto& p : m.owned) before.push_back(ToVector(p->grad));
    for (double max_norm : {0.0, -1.0, 10 * ref}) {
      auto n = ClipGradNorm(m.list, groups, max_norm);
      REQUIRE(n.ok());
      CHECK(std::abs(*n - ref) <= 1e-6 * ref);
      for (size_t i = 0; i < m.owned.size(); ++i) CHECK(ToVector(m.owned[i]->grad) == before[i]);
    }

    // Below the norm: every local gradient scaled by max_norm / (norm + 1e-6).
    const double max_norm = ref / 3;
    auto pre = ClipGradNorm(m.list, groups, max_norm);
    REQUIRE(pre.ok());
    CHECK(std::abs(*pre - ref) <= 1e-6 * ref);
    const float coeff = static_cast<float>(max_norm / (*pre + 1e-6));
    for (size_t i = 0; i < m.owned.size(); ++i) {
      const std::vector<float> after = ToVector(m.owned[i]->grad);
      for (size_t j = 0; j < after.size(); ++j) CHECK(after[j] == before[i][j] * coeff);
    }
    auto post = GlobalGradNorm(m.list, groups);
    REQUIRE(post.ok());
    CHECK(std::abs(*post - max_norm) <= 1e-6 * max_norm);
  }
}

TEST_CASE("ClipCoefficient: the factor clipping applies, 1 when off or not finite") {
  CHECK(ClipCoefficient(4.0, 1.0) == 1.0 / (4.0 + 1e-6));
  CHECK(ClipCoefficient(0.5, 1.0) == 1.0);  // below the limit: no clipping
  CHECK(ClipCoefficient(4.0, 0.0) == 1.0);  // optim.clip_grad = 0: off
  CHECK(ClipCoefficient(4.0, -1.0) == 1.0);
  CHECK(ClipCoefficient(std::nan(""), 1.0) == 1.0);  // the trainer stops on this norm
  CHECK(ClipCoefficient(INFINITY, 1.0) == 1.0);
}

TEST_CASE("Counting rule: each shard once") {
  for (const TpEp& layout : kLayouts) {
    parallel::ProcessGroups groups = MakeGroups(layout.tp, layout.ep);
    TestModel m;
    BuildModel(m, groups.layout);
    // Global elements counted, summed over the world, equal the model's size.
    double counted = 0;
    for (auto& p : m.owned) {
      if (CountsInGlobalNorm(*p, groups.layout)) counted += static_cast<double>(p->value.numel());
    }
    auto w = groups.world->AllReduce(&counted, &counted, 1, DType::kF64, comm::ReduceOp::kSum);
    REQUIRE(w.ok());
    REQUIRE(w->Wait().ok());
    CHECK(counted == static_cast<double>(m.list.GlobalNumel()));
  }
}

TEST_CASE("First non-finite gradient is named on every rank") {
  for (const TpEp& layout : {TpEp{1, 1}, TpEp{2, 2}, TpEp{1, 4}}) {
    parallel::ProcessGroups groups = MakeGroups(layout.tp, layout.ep);
    const int rank = groups.layout.rank;
    TestModel m;
    BuildModel(m, groups.layout);
    for (auto& p : m.owned) testing::FillShard(*p, p->grad, kGradSalt);
    auto none = FirstNonFiniteGrad(m.list, groups);
    REQUIRE(none.ok());
    CHECK_FALSE(none->has_value());

    // A NaN in rank 3's shard of experts.down only.
    if (rank == 3)
      m.list.Find("experts.down")->grad.data<float>()[2] = std::numeric_limits<float>::quiet_NaN();
    auto first = FirstNonFiniteGrad(m.list, groups);
    REQUIRE(first.ok());
    REQUIRE(first->has_value());
    CHECK(**first == "experts.down");
    // An Inf earlier in the list, on rank 1: that one comes first.
    if (rank == 1) m.list.Find("col")->grad.data<float>()[0] = std::numeric_limits<float>::infinity();
    first = FirstNonFiniteGrad(m.list, groups);
    REQUIRE(first.ok());
    REQUIRE(first->has_value());
    CHECK(**first == "col");

    // The norm is non-finite on every rank exactly when a bad shard is counted
    // (rank 3's experts.down when its edp_rank is 0, rank 1's col when it
    // counts col), and then clipping leaves the gradients alone.
    const std::vector<float> before = ToVector(m.list.Find("router")->grad);
    auto norm = ClipGradNorm(m.list, groups, 1.0);
    REQUIRE(norm.ok());
    bool counted_bad = false;
    {
      double bad = 0;
      if (rank == 3 && CountsInGlobalNorm(*m.list.Find("experts.down"), groups.layout)) bad = 1;
      if (rank == 1 && CountsInGlobalNorm(*m.list.Find("col"), groups.layout)) bad = 1;
      auto w = groups.world->AllReduce(&bad, &bad, 1, DType::kF64, comm::ReduceOp::kMax);
      REQUIRE(w.ok());
      REQUIRE(w->Wait().ok());
      counted_bad = bad > 0;
    }
    CHECK(std::isfinite(*norm) == !counted_bad);
    if (counted_bad) CHECK(ToVector(m.list.Find("router")->grad) == before);
  }
}

}  // namespace
}  // namespace moe::optim
