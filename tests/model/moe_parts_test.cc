// Router decisions on hand-made probabilities, the local dispatcher's
// permutation, and GroupedExperts against SequentialExperts.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "model/erc_loss.h"
#include "model/experts.h"
#include "model/router.h"
#include "model/token_dispatcher.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "tests/compare.h"
#include "tests/model/model_test_util.h"

namespace moe::model {
namespace {

using testing::CpuStream;
using testing::RandomTensor;
using testing::ToVec;

TEST_CASE("HostUploads puts several arrays in one buffer, each a view with its shape and dtype") {
  Stream& s = CpuStream();
  HostUploads up;
  const std::vector<int32_t> ints = {3, -1, 7};
  const std::vector<float> floats = {0.5f, 1.5f, -2.0f, 4.0f};
  const size_t a = up.AddInts(ints, Shape{3});
  const size_t b = up.AddFloats({}, Shape{0, 2});  // empty
  const size_t c = up.AddFloats(floats, Shape{2, 2});
  auto tables = up.Upload(s);
  REQUIRE(tables.ok());
  REQUIRE(tables->size() == 3);
  const Tensor& ti = (*tables)[a];
  const Tensor& tf = (*tables)[c];
  CHECK(ti.dtype() == DType::kI32);
  CHECK(ti.shape() == Shape{3});
  CHECK(std::vector<int32_t>(ti.data<int32_t>(), ti.data<int32_t>() + 3) == ints);
  CHECK((*tables)[b].numel() == 0);
  CHECK(tf.shape() == Shape{2, 2});
  CHECK(ToVec(tf) == floats);
  // One buffer, each array 256-byte aligned within it, none overlapping.
  CHECK(ti.buffer() == tf.buffer());
  CHECK(ti.byte_offset() % 256 == 0);
  CHECK(tf.byte_offset() % 256 == 0);
  CHECK(!ti.Overlaps(tf));
  // A shape that does not hold the values is refused, naming the array.
  HostUploads bad;
  bad.AddInts(ints, Shape{3});
  bad.AddFloats(floats, Shape{5});
  auto refused = bad.Upload(s);
  REQUIRE(!refused.ok());
  CHECK(std::string(refused.status().message()).find("array 1 has 4 values for shape [5]") !=
        std::string::npos);
}

TEST_CASE("HostReadback reads several tensors with one wait and does not wait for work enqueued after it") {
  auto worker = CpuStream().backend().CreateStream(StreamMode::kWorker);
  REQUIRE(worker.ok());
  Stream& s = **worker;
  const std::vector<float> av = {1.0f, -2.0f, 3.5f}, bv = {0.25f, 8.0f, -1.0f, 6.0f, 7.0f, 9.5f};
  auto a = FromHostFloats(s, av, Shape{3});
  auto b = FromHostFloats(s, bv, Shape{2, 3});
  auto none = FromHostFloats(s, {}, Shape{0, 4});
  REQUIRE((a.ok() && b.ok() && none.ok()));
  HostReadback read;
  const size_t ia = read.Add(*a), in = read.Add(*none), ib = read.Add(*b);
  CHECK(read.values(ia).empty());  // nothing before Wait
  REQUIRE(read.Start(s).ok());
  CHECK(read.Start(s).code() == absl::StatusCode::kFailedPrecondition);  // not waited for yet
  // Work after Start: the stream stops at a closed gate, then overwrites a.
  auto gate = std::make_shared<HostGate>();
  REQUIRE(s.WaitHostGate(gate).ok());
  REQUIRE(ops::Fill(s, *a, 42.0).ok());
  // Wait returns with the gate still closed (it waits for the copies only,
  // not for the stream), with one host wait, and the values from before the
  // fill. (Were it to wait for the stream, the gate would be opened by this
  // thread after 5 s, and the check below fail.)
  std::atomic<bool> waited{false};
  std::thread opener([&] {
    for (int i = 0; i < 500 && !waited; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (!waited) gate->Open(absl::OkStatus());
  });
  const uint64_t waits = HostSyncCount();
  const absl::Status waited_status = read.Wait();
  const bool opened_meanwhile = gate->is_open();
  waited = true;
  opener.join();
  REQUIRE(waited_status.ok());
  CHECK(HostSyncCount() - waits == 1);
  CHECK_FALSE(opened_meanwhile);
  const absl::Span<const float> got_a = read.values(ia), got_b = read.values(ib);
  CHECK(std::vector<float>(got_a.begin(), got_a.end()) == av);
  CHECK(std::vector<float>(got_b.begin(), got_b.end()) == bv);
  CHECK(read.values(in).empty());
  CHECK(read.values(7).empty());
  gate->Open(absl::OkStatus());
  REQUIRE(s.Synchronize().ok());
  CHECK(ToVec(*a) == std::vector<float>(3, 42.0f));
  // A second read reuses the staging buffer and sees the new values.
  read.Reset();
  const size_t again = read.Add(*a);
  REQUIRE(read.Start(s).ok());
  REQUIRE(read.Wait().ok());
  CHECK(std::vector<float>(read.values(again).begin(), read.values(again).end()) ==
        std::vector<float>(3, 42.0f));
  CHECK(read.Wait().code() == absl::StatusCode::kFailedPrecondition);  // nothing started
  // i32 tensors beside f32 ones (the router's choice), each read as its own dtype.
  auto ints = FromHostInts(s, std::vector<int32_t>{1, -2, 1 << 30}, Shape{3});
  REQUIRE(ints.ok());
  read.Reset();
  const size_t int_i = read.Add(*ints), float_i = read.Add(*a);
  REQUIRE(read.Start(s).ok());
  REQUIRE(read.Wait().ok());
  CHECK(std::vector<int32_t>(read.int_values(int_i).begin(), read.int_values(int_i).end()) ==
        std::vector<int32_t>{1, -2, 1 << 30});
  CHECK(read.values(int_i).empty());
  CHECK(read.int_values(float_i).empty());
  CHECK(read.values(float_i).size() == 3);
  // Other dtypes are refused, named.
  auto half = Tensor::Empty(s.backend(), Shape{2}, DType::kBF16, MemoryCategory::kActivations);
  REQUIRE(half.ok());
  read.Reset();
  read.Add(*half);
  const absl::Status refused = read.Start(s);
  CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(refused.message()).find("is not an f32 or i32 tensor") != std::string::npos);
}

TEST_CASE("HostReadback::Collect takes a landed read without a wait and refuses one still in flight") {
  auto worker = CpuStream().backend().CreateStream(StreamMode::kWorker);
  REQUIRE(worker.ok());
  Stream& s = **worker;
  auto a = FromHostFloats(s, std::vector<float>{1.5f, -4.0f}, Shape{2});
  REQUIRE(a.ok());
  HostReadback read;
  const size_t ia = read.Add(*a);
  CHECK(read.Collect().code() == absl::StatusCode::kFailedPrecondition);  // nothing started
  // The stream stops at a closed gate before the copies: they have not landed.
  auto gate = std::make_shared<HostGate>();
  REQUIRE(s.WaitHostGate(gate).ok());
  REQUIRE(read.Start(s).ok());
  const uint64_t waits = HostSyncCount();
  const absl::Status early = read.Collect();
  CHECK(early.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(early.message()).find("have not landed") != std::string::npos);
  CHECK(read.values(ia).empty());
  CHECK(HostSyncCount() == waits);  // queried, never waited on
  // Later work, then one wait for the stream (as the gradient norm's read):
  // the earlier read is taken without a second wait.
  REQUIRE(ops::Fill(s, *a, 9.0).ok());
  gate->Open(absl::OkStatus());
  REQUIRE(s.Synchronize().ok());
  CHECK(HostSyncCount() - waits == 1);
  REQUIRE(read.Collect().ok());
  CHECK(HostSyncCount() - waits == 1);
  CHECK(std::vector<float>(read.values(ia).begin(), read.values(ia).end()) ==
        std::vector<float>{1.5f, -4.0f});
  CHECK(read.Collect().code() == absl::StatusCode::kFailedPrecondition);  // taken already
}

TEST_CASE("Top-k ties go to the lower expert index") {
  // Token 0: all equal. Token 1: experts 1 and 3 tie for first.
  std::vector<double> p = {0.25, 0.25, 0.25, 0.25, 0.1, 0.35, 0.2, 0.35};
  RoutingPlan plan = ComputeRoutingPlan(p, 2, 4, 2, true, 0.0, false);
  CHECK(plan.experts == std::vector<int32_t>{0, 1, 1, 3});
  CHECK(plan.weights[0] == Approx(0.5));
  CHECK(plan.weights[2] == Approx(0.5));
  CHECK(plan.capacity == -1);
  CHECK(plan.num_dropped() == 0);
  CHECK(plan.tokens_per_expert == std::vector<int64_t>{1, 2, 0, 1});
  // norm_topk_prob false keeps p.
  RoutingPlan raw = ComputeRoutingPlan(p, 2, 4, 2, false, 0.0, false);
  CHECK(raw.weights[3] == Approx(0.35));
}

TEST_CASE("Expert bias steers the choice only; groups limit it to the best groups") {
  const std::vector<double> s = {0.5, 0.4, 0.3, 0.2};
  RoutingOptions opt;
  opt.top_k = 2;
  // u = s + b = [0.5, 0.4, 0.6, 0.2]: experts 2 and 0; weights from s.
  const std::vector<float> bias = {0, 0, 0.3f, 0};
  RoutingPlan biased = ComputeRoutingPlan(s, bias, 1, 4, opt);
  CHECK(biased.experts == std::vector<int32_t>{2, 0});
  CHECK(biased.weights[0] == Approx(0.3 / 0.8));
  CHECK(biased.weights[1] == Approx(0.5 / 0.8));
  // Two groups {0, 1} {2, 3}, one kept; a group's score is its top k / 1 = 2 scores.
  opt.num_groups = 2;
  opt.group_topk = 1;
  // Unbiased: 0.9 vs 0.5 -> group 0. Biased as above: 0.9 vs 0.8 -> group 0 still.
  CHECK(ComputeRoutingPlan(s, {}, 1, 4, opt).experts == std::vector<int32_t>{0, 1});
  CHECK(ComputeRoutingPlan(s, bias, 1, 4, opt).experts == std::vector<int32_t>{0, 1});
  // b = [0, 0, 0.3, 0.2]: group 1 scores 1.0 > 0.9, its experts are taken, weights from s.
  RoutingPlan g = ComputeRoutingPlan(s, std::vector<float>{0, 0, 0.3f, 0.2f}, 1, 4, opt);
  CHECK(g.experts == std::vector<int32_t>{2, 3});
  CHECK(g.weights[0] == Approx(0.3 / 0.5));
  CHECK(g.selected_per_expert == std::vector<int64_t>{0, 0, 1, 1});
  // Equal group scores: the lower group.
  CHECK(ComputeRoutingPlan(std::vector<double>{0.1, 0.2, 0.2, 0.1}, {}, 1, 4, opt).experts ==
        std::vector<int32_t>{1, 0});
}

TEST_CASE("Expert bias update: rate x sign(mean load - load) from the summed load, then the load resets") {
  Stream& st = CpuStream();
  config::ModelConfig cfg =
      testing::TinyConfig("hidden_size: 8 moe { num_experts: 4 top_k: 1 expert_bias_update_rate: 0.25 }");
  Router router;
  REQUIRE(router.Init(st, "model.layers.0.mlp.", cfg, 0.5f, 3).ok());
  REQUIRE(router.has_expert_bias());
  CHECK(router.expert_bias().name == "model.layers.0.mlp.router.expert_bias");
  CHECK(ToVec(router.expert_bias().value) == std::vector<float>{0, 0, 0, 0});
  std::mt19937 rng(1);
  Tensor x = RandomTensor(Shape{6, 8}, rng);
  auto plan = router.Forward(st, x);
  REQUIRE(plan.ok());
  const std::vector<int64_t> selected = (*plan)->selected_per_expert;
  // Forward alone (evaluation) records no load; Backward does.
  CHECK(router.pending_load() == std::vector<int64_t>(4, 0));
  REQUIRE(router.Backward(st, testing::NewTensor(Shape{6}, std::vector<float>(6, 0.0f)), 1.0f, 1.0f).ok());
  CHECK(router.pending_load() == selected);
  // Mean 2.5: loads 4, 1, 2.5, 2.5 -> -0.25, +0.25, 0, 0.
  REQUIRE(router.UpdateExpertBias(st, std::vector<double>{4, 1, 2.5, 2.5}).ok());
  CHECK(ToVec(router.expert_bias().value) == std::vector<float>{-0.25f, 0.25f, 0, 0});
  CHECK(router.pending_load() == std::vector<int64_t>(4, 0));
  CHECK(!router.UpdateExpertBias(st, std::vector<double>{1, 2}).ok());
  Router plain;
  REQUIRE(plain.Init(st, "model.layers.0.mlp.", testing::TinyConfig("moe { num_experts: 4 }"), 0.5f, 3).ok());
  CHECK(!plain.has_expert_bias());
  CHECK(!plain.UpdateExpertBias(st, std::vector<double>{1, 2, 3, 4}).ok());
}

TEST_CASE("k = E selects every expert in descending order") {
  std::vector<double> p = {0.2, 0.5, 0.3};
  RoutingPlan plan = ComputeRoutingPlan(p, 1, 3, 3, true, 0.0, false);
  CHECK(plan.experts == std::vector<int32_t>{1, 2, 0});
  CHECK(plan.weights[0] == Approx(0.5));
}

TEST_CASE("Capacity: probs policy keeps the highest weights, ties to the lower token") {
  // 5 tokens, E = 2, k = 1, c = 1.0 -> cap = ceil(5 / 2) = 3. All pick expert 0.
  std::vector<double> p = {0.6, 0.4, 0.9, 0.1, 0.6, 0.4, 0.7, 0.3, 0.6, 0.4};
  RoutingPlan probs = ComputeRoutingPlan(p, 5, 2, 1, false, 1.0, false);
  CHECK(probs.capacity == 3);
  // Weights 0.6, 0.9, 0.6, 0.7, 0.6: keep t1 (0.9), t3 (0.7), then t0 (0.6, lowest t of the tie).
  CHECK(probs.kept == std::vector<uint8_t>{1, 1, 0, 1, 0});
  CHECK(probs.selected_per_expert == std::vector<int64_t>{5, 0});
  CHECK(probs.tokens_per_expert == std::vector<int64_t>{3, 0});
  RoutingPlan pos = ComputeRoutingPlan(p, 5, 2, 1, false, 1.0, true);
  CHECK(pos.kept == std::vector<uint8_t>{1, 1, 1, 0, 0});
  // Normalised top-1 weights are all 1: a pure tie, so the lowest tokens win.
  RoutingPlan tie = ComputeRoutingPlan(p, 5, 2, 1, true, 1.0, false);
  CHECK(tie.kept == std::vector<uint8_t>{1, 1, 1, 0, 0});
}

TEST_CASE("Routing many tokens with ties: a sort's choice, counts and capacity from the choice") {
  // Scores on a grid of eighths, so most tokens hold ties. Each token's choice
  // (kmath::RouterChooseRow, as ops::RouterScores makes it) must be what a
  // full sort by (score descending, expert ascending) gives, and the plan's
  // counts must be the choice's. (The op's thread-count independence:
  // tests/core/ops_test.cc.)
  std::mt19937 rng(11);
  struct Setup {
    int64_t experts;
    int top_k, groups, group_topk;
    double capacity;
  };
  for (const Setup& setup :
       std::vector<Setup>{{8, 2, 1, 0, 0.0}, {16, 4, 4, 2, 1.0}, {8, 1, 1, 0, 1.25}, {6, 6, 1, 0, 0.0}}) {
    // Plain locals: the lambdas below capture them.
    const int64_t E = setup.experts;
    const int k = setup.top_k, groups = setup.groups, group_topk = setup.group_topk;
    const double capacity = setup.capacity;
    INFO("E " << E << " k " << k << " groups " << groups << "/" << group_topk << " capacity " << capacity);
    const int64_t T = 3001;
    std::vector<double> s(T * E);
    for (double& v : s) v = static_cast<double>(rng() % 8) / 8.0;
    std::vector<float> bias(E);
    for (float& b : bias) b = static_cast<float>(rng() % 3) / 8.0f;
    RoutingOptions opt;
    opt.top_k = k;
    opt.norm_topk_prob = true;
    opt.capacity_factor = capacity;
    opt.num_groups = groups;
    opt.group_topk = group_topk;
    const RoutingPlan four = ComputeRoutingPlan(s, bias, T, E, opt);
    std::vector<int64_t> chosen(E, 0), kept(E, 0);
    for (int64_t a = 0; a < T * k; ++a) {
      ++chosen[four.experts[a]];
      kept[four.experts[a]] += four.kept[a];
    }
    CHECK(four.selected_per_expert == chosen);
    CHECK(four.tokens_per_expert == kept);
    for (int64_t e = 0; e < E && capacity > 0; ++e) CHECK(kept[e] == std::min(chosen[e], four.capacity));
    if (groups > 1) continue;  // the group stage is checked by the cases above
    int64_t wrong = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      const auto u = [&](int32_t e) { return s[t * E + e] + static_cast<double>(bias[e]); };
      std::sort(order.begin(), order.end(),
                [&](int32_t a, int32_t b) { return u(a) > u(b) || (u(a) == u(b) && a < b); });
      for (int j = 0; j < k; ++j) wrong += four.experts[t * k + j] != order[j];
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("Capacity uses ceil(c T k / E) and T not divisible by E") {
  std::mt19937 rng(3);
  const int64_t T = 7, E = 3;
  std::vector<double> p(T * E);
  for (double& v : p) v = std::uniform_real_distribution<double>(0.01, 1.0)(rng);
  RoutingPlan plan = ComputeRoutingPlan(p, T, E, 2, true, 0.5, false);
  CHECK(plan.capacity == 3);  // ceil(0.5 * 7 * 2 / 3) = ceil(2.33)
  for (int64_t e = 0; e < E; ++e) {
    CHECK(plan.tokens_per_expert[e] == std::min<int64_t>(plan.selected_per_expert[e], 3));
  }
}

TEST_CASE("Local dispatch groups tokens by expert and combine is the weighted sum") {
  Stream& s = CpuStream();
  std::mt19937 rng(5);
  const int64_t T = 6, E = 4, d = 3;
  std::vector<double> p(T * E);
  for (double& v : p) v = std::uniform_real_distribution<double>(0.01, 1.0)(rng);
  // Expert 2 gets no token: make it the smallest everywhere.
  for (int64_t t = 0; t < T; ++t) p[t * E + 2] = 0.001;
  RoutingPlan plan = ComputeRoutingPlan(p, T, E, 2, true, 1.0, false);
  Tensor x = RandomTensor(Shape{T, d}, rng);
  const std::vector<float> xv = ToVec(x);
  LocalTokenDispatcher disp(0, E);
  auto in = disp.Dispatch(s, x, plan);
  REQUIRE(in.ok());
  REQUIRE(in->offsets.size() == E + 1);
  CHECK(in->offsets[3] - in->offsets[2] == 0);
  const std::vector<float> rows = ToVec(in->tokens);
  // Each row of expert e is a kept token of e, ascending t.
  for (int64_t e = 0; e < E; ++e) {
    int64_t r = in->offsets[e];
    for (int64_t t = 0; t < T; ++t)
      for (int j = 0; j < 2; ++j)
        if (plan.experts[t * 2 + j] == e && plan.kept[t * 2 + j]) {
          for (int c = 0; c < d; ++c) CHECK(rows[r * d + c] == xv[t * d + c]);
          ++r;
        }
    CHECK(r == in->offsets[e + 1]);
  }
  // Identity experts: combine(dispatch(x)) = sum over kept of w * x_t.
  auto y = disp.Combine(s, in->tokens);
  REQUIRE(y.ok());
  const std::vector<float> yv = ToVec(*y);
  for (int64_t t = 0; t < T; ++t) {
    double w = 0;
    for (int j = 0; j < 2; ++j) w += plan.kept[t * 2 + j] ? plan.weights[t * 2 + j] : 0.0;
    for (int c = 0; c < d; ++c) CHECK(yv[t * d + c] == Approx(w * xv[t * d + c]).margin(1e-6));
  }
  // Backward: d out = w dy[t]; d w = dy[t] . out; dx accumulates the rows.
  Tensor dy = RandomTensor(Shape{T, d}, rng);
  std::vector<float> dyv = ToVec(dy);
  Tensor dweights_dev;
  auto dout = disp.CombineBackward(s, dy, &dweights_dev);
  REQUIRE(dout.ok());
  const std::vector<float> dweights = ToVec(dweights_dev);
  const std::vector<float> doutv = ToVec(*dout);
  std::vector<float> dx_expect(T * d, 0.0f);
  std::vector<int64_t> next(in->offsets.begin(), in->offsets.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < 2; ++j) {
      const int64_t a = t * 2 + j;
      if (!plan.kept[a]) {
        CHECK(dweights[a] == 0.0f);
        continue;
      }
      const int64_t r = next[plan.experts[a]]++;
      double dot = 0;
      for (int c = 0; c < d; ++c) {
        CHECK(doutv[r * d + c] == Approx(plan.weights[a] * dyv[t * d + c]).margin(1e-6));
        dot += static_cast<double>(dyv[t * d + c]) * xv[t * d + c];
        dx_expect[t * d + c] += doutv[r * d + c];
      }
      CHECK(dweights[a] == Approx(dot).margin(1e-5));
    }
  // dx is overwritten, never read: it starts as NaN.
  Tensor dx =
      testing::NewTensor(Shape{T, d}, std::vector<float>(T * d, std::numeric_limits<float>::quiet_NaN()));
  REQUIRE(disp.DispatchBackward(s, *dout, dx).ok());
  const std::vector<float> dxv = ToVec(dx);
  for (int64_t i = 0; i < T * d; ++i) CHECK(dxv[i] == Approx(dx_expect[i]).margin(1e-6));
}

// Runs forward and backward of `ex` on (x, offsets, dy) after setting its weights.
struct ExpertsRun {
  std::vector<float> y, dx, dg, du, dd;
};

ExpertsRun RunExperts(Experts& ex, const Tensor& x, const std::vector<int64_t>& offsets, const Tensor& dy) {
  Stream& s = CpuStream();
  auto y = ex.Forward(s, x, offsets);
  REQUIRE(y.ok());
  ExpertsRun r;
  r.y = ToVec(*y);
  auto dx = ex.Backward(s, dy);
  REQUIRE(dx.ok());
  r.dx = ToVec(*dx);
  r.dg = ToVec(ex.gate_proj().grad);
  r.du = ToVec(ex.up_proj().grad);
  r.dd = ToVec(ex.down_proj().grad);
  return r;
}

// |grouped - sequential| <= 1e-6 * max(1, max |sequential|); NaN/Inf fail.
void ExpectClose(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  double scale = 1;
  for (float v : b)
    if (std::isfinite(v)) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  const moe::testing::Closeness c = moe::testing::Compare(a, b, {.atol = 1e-6 * scale}, what);
  INFO(c.message);
  CHECK(c.ok);
}

TEST_CASE("GroupedExperts equals SequentialExperts to 1e-6") {
  Stream& s = CpuStream();
  struct Case {
    int64_t E, e0, e1;
    std::vector<int64_t> counts;  // rows per local expert
  };
  for (const Case& c : {Case{4, 0, 4, {5, 0, 9, 3}}, Case{6, 2, 5, {7, 1, 0}}, Case{3, 0, 3, {0, 0, 0}},
                        Case{8, 0, 8, {40, 3, 0, 17, 1, 0, 64, 9}}}) {
    DYNAMIC_SECTION("E " << c.E << " experts [" << c.e0 << ", " << c.e1 << ")") {
      std::mt19937 rng(9);
      const int64_t d = 16, fe = 12;
      SequentialExperts seq;
      GroupedExperts grp;
      REQUIRE(seq.Init(s, "model.layers.0.mlp.experts.", d, fe, c.E, c.e0, c.e1, 0.3f, 0.2f, 4).ok());
      REQUIRE(grp.Init(s, "model.layers.0.mlp.experts.", d, fe, c.E, c.e0, c.e1, 0.3f, 0.2f, 4).ok());
      CHECK(ToVec(seq.gate_proj().value) == ToVec(grp.gate_proj().value));
      std::vector<int64_t> offsets = {0};
      for (int64_t n : c.counts) offsets.push_back(offsets.back() + n);
      const int64_t n = offsets.back();
      Tensor x = RandomTensor(Shape{n, d}, rng);
      Tensor dy = RandomTensor(Shape{n, d}, rng);
      ExpertsRun a = RunExperts(seq, x, offsets, dy);
      ExpertsRun b = RunExperts(grp, x, offsets, dy);
      ExpectClose(b.y, a.y, "y");
      ExpectClose(b.dx, a.dx, "dx");
      ExpectClose(b.dg, a.dg, "d gate_proj");
      ExpectClose(b.du, a.du, "d up_proj");
      ExpectClose(b.dd, a.dd, "d down_proj");
      // An expert without tokens has a zero gradient.
      for (size_t i = 0; i < c.counts.size(); ++i) {
        if (c.counts[i] != 0) continue;
        const int64_t per = fe * d;
        for (int64_t j = 0; j < per; ++j) CHECK(b.dg[i * per + j] == 0.0f);
      }
    }
  }
}

TEST_CASE("Experts reject offsets that do not match the rows") {
  Stream& s = CpuStream();
  GroupedExperts grp;
  REQUIRE(grp.Init(s, "model.layers.0.mlp.experts.", 4, 4, 2, 0, 2, 0.1f, 0.1f, 1).ok());
  std::mt19937 rng(1);
  Tensor x = RandomTensor(Shape{5, 4}, rng);
  auto y = grp.Forward(s, x, std::vector<int64_t>{0, 2, 4});
  REQUIRE(!y.ok());
  CHECK(std::string(y.status().message()).find("offsets") != std::string::npos);
}

TEST_CASE(
    "Coupling loss: proxies within half the nearest-row distance, noise per (seed, layer, step), the "
    "hinges") {
  Stream& s = CpuStream();
  std::mt19937 rng(3);
  const int64_t E = 4, d = 6, Fe = 5;
  Tensor router = RandomTensor(Shape{E, d}, rng), gate = RandomTensor(Shape{E, Fe, d}, rng);
  std::vector<float> r = ToVec(router), g = ToVec(gate);
  config::MoeConfig moe;
  moe.set_erc_loss_coeff(0.5);
  moe.set_erc_alpha(0.7);
  auto run = [&](const std::string& prefix, uint64_t seed, int64_t step) {
    ErcLoss erc;
    erc.Init(prefix, moe, seed, {});
    erc.set_step(step);
    REQUIRE(erc.enabled());
    auto l = erc.Forward(s, router, gate, 0, nullptr);
    REQUIRE(l.ok());
    return erc;
  };
  ErcLoss a = run("model.layers.1.mlp.", 7, 3);
  // |delta - 1| <= eps_i = min_j ||R_i - R_j|| / (2 ||R_i||), and the noise is not constant.
  double spread = 0;
  for (int64_t i = 0; i < E; ++i) {
    double norm = 0, nearest = INFINITY;
    for (int64_t c = 0; c < d; ++c) norm += double(r[i * d + c]) * r[i * d + c];
    for (int64_t j = 0; j < E; ++j) {
      if (j == i) continue;
      double s2 = 0;
      for (int64_t c = 0; c < d; ++c) s2 += std::pow(double(r[i * d + c]) - r[j * d + c], 2);
      nearest = std::min(nearest, std::sqrt(s2));
    }
    const double eps = nearest / (2 * std::sqrt(norm));
    for (int64_t c = 0; c < d; ++c) {
      CHECK(std::abs(a.noise()[i * d + c] - 1.0) <= eps);
      spread = std::max(spread, std::abs(a.noise()[i * d + c] - 1.0) / eps);
    }
  }
  CHECK(spread > 0.5);
  // M_ij = ||P_i Wg_j^T|| and L = coeff / E^2 sum_{i != j} hinges, recomputed here.
  double want = 0;
  std::vector<double> m(E * E);
  for (int64_t i = 0; i < E; ++i) {
    for (int64_t j = 0; j < E; ++j) {
      double s2 = 0;
      for (int64_t f = 0; f < Fe; ++f) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += r[i * d + c] * a.noise()[i * d + c] * g[(j * Fe + f) * d + c];
        s2 += dot * dot;
      }
      m[i * E + j] = std::sqrt(s2);
      CHECK(std::abs(a.activation_norms()[i * E + j] - m[i * E + j]) <= 1e-5 * m[i * E + j]);
    }
  }
  for (int64_t i = 0; i < E; ++i)
    for (int64_t j = 0; j < E; ++j)
      if (j != i)
        want += std::max(0.0, m[i * E + j] - 0.7 * m[i * E + i]) +
                std::max(0.0, m[j * E + i] - 0.7 * m[i * E + i]);
  want *= 0.5 / (E * E);
  CHECK(want > 0);
  CHECK(std::abs(a.loss() - want) <= 1e-5 * want);
  // Same (seed, layer, step): the same noise; another step, seed or layer: another.
  CHECK(run("model.layers.1.mlp.", 7, 3).noise() == a.noise());
  CHECK(run("model.layers.1.mlp.", 7, 4).noise() != a.noise());
  CHECK(run("model.layers.1.mlp.", 8, 3).noise() != a.noise());
  CHECK(run("model.layers.3.mlp.", 7, 3).noise() != a.noise());
  // Off by default.
  ErcLoss off;
  off.Init("model.layers.1.mlp.", config::MoeConfig(), 7, {});
  CHECK(!off.enabled());
}

}  // namespace
}  // namespace moe::model
