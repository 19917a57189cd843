// Single-rank optimizer tests: AdamW and SGD against hand-computed steps (the
// closed-form numbers below were computed in float64 with torch.optim's update
// rules), the weight-decay switches, state save/load and the LR schedule.
#include "optim/optimizer.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "optim/lr_schedule.h"
#include "optim_test_util.h"
#include "runtime/core/config.h"
#include "runtime/core/config.pb.h"

namespace moe::optim {
namespace {

using testing::Cpu;
using testing::SetValues;
using testing::TestModel;
using testing::ToVector;

const std::vector<float> kP0 = {1.0f, -2.0f, 0.5f, 3.0f};
const std::vector<std::vector<float>> kGrads = {
    {0.1f, -0.2f, 0.3f, 0.0f}, {-0.5f, 0.4f, 0.0f, 1.0f}, {0.2f, 0.2f, -0.1f, -1.0f}};
const double kLr[3] = {0.1, 0.05, 0.02};

using Rows = std::vector<std::vector<double>>;

// torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), 3 steps.
const Rows kAdamWDecay = {{0.89000000999999895, -1.8800000049999996, 0.39500000333333318, 2.9699999999999998},
                          {0.91546771822616657, -1.8889051807480182, 0.35952209218957715, 2.9179431593477032},
                          {0.9175806812541033, -1.8955121863436473, 0.35302034105922186, 2.9130109178134855}};
const std::vector<double> kAdamWDecayExpAvg = {-0.016899999999999991, 0.039799999999999988,
                                               0.014299999999999997, -0.009999999999999995};
const std::vector<double> kAdamWDecayExpAvgSq = {0.00029973001000000029, 0.00023976004000000027,
                                                 9.9820090000000091e-05, 0.0019990000000000016};
// Same without weight decay.
const Rows kAdamWNoDecay = {
    {0.90000000999999896, -1.9000000049999997, 0.40000000333333319, 3},
    {0.92991771827616654, -1.9183051807730183, 0.36649709220624382, 2.9627931593477035},
    {0.93386161674055557, -1.9286899967301434, 0.36071438526026772, 2.9636968041321814}};
// torch.optim.SGD(lr, momentum, weight_decay).
const Rows kSgd = {{0.99, -1.98, 0.47, 3}, {1.015, -2, 0.47, 2.95}, {1.011, -2.004, 0.472, 2.97}};
const Rows kSgdDecay = {{0.98, -1.96, 0.465, 2.97},
                        {1.0001, -1.9702, 0.462675, 2.90515},
                        {0.9940998, -1.9702596, 0.46374965, 2.9193397}};
const Rows kSgdMomentum = {
    {0.99, -1.98, 0.47, 3}, {1.0105, -1.991, 0.4565, 2.95}, {1.01388, -1.99896, 0.45364, 2.952}};
const Rows kSgdMomentumDecay = {{0.98, -1.96, 0.465, 2.97},
                                {0.9911, -1.9522, 0.446925, 2.89165},
                                {0.9891138, -1.9494876, 0.44152415, 2.8776607}};

void CheckClose(const std::vector<float>& got, const std::vector<double>& want, double rel = 2e-6) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << ", want " << want[i]);
    CHECK(std::abs(got[i] - want[i]) <= rel * std::max(1.0, std::abs(want[i])));
  }
}

// Runs 3 steps on a [2, 2] parameter with the given flags; checks every step.
// Then again with a bf16 compute copy (train.precision bf16): the masters take
// the same values bit for bit, and every step leaves the copy equal to them
// rounded to bf16, with no refresh by the caller.
void RunThreeSteps(const OptimizerOptions& options, bool weight_decay_flag, const Rows& expected) {
  std::vector<std::vector<float>> plain;
  for (bool with_copy : {false, true}) {
    INFO((with_copy ? "with" : "without") << " a bf16 compute copy");
    TestModel m;
    parallel::Parameter* p =
        m.Add("w", Shape{2, 2}, parallel::ParamKind::kDense, parallel::ShardSpec{}, weight_decay_flag);
    SetValues(p->value, kP0);
    if (with_copy) testing::AddComputeCopy(*p);
    auto opt = Optimizer::Create(options, m.list, nullptr);
    REQUIRE(opt.ok());
    for (int s = 0; s < 3; ++s) {
      SetValues(p->grad, kGrads[s]);
      REQUIRE((*opt)->Step(kLr[s]).ok());
      CHECK((*opt)->step() == s + 1);
      INFO("step " << s + 1);
      CheckClose(ToVector(p->value), expected[s]);
      if (!with_copy) {
        plain.push_back(ToVector(p->value));
        continue;
      }
      CHECK(ToVector(p->value) == plain[s]);
      CHECK(testing::ComputeCopyMismatches(*p).empty());
    }
  }
}

TEST_CASE("AdamW matches hand-computed steps, with and without decay") {
  OptimizerOptions o;
  o.type = OptimizerType::kAdamW;
  o.beta1 = 0.9;
  o.beta2 = 0.999;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  SECTION("decayed parameter") { RunThreeSteps(o, true, kAdamWDecay); }
  SECTION("parameter without decay (norm, embedding)") { RunThreeSteps(o, false, kAdamWNoDecay); }
  SECTION("decay_all decays it anyway") {
    o.decay_all = true;
    RunThreeSteps(o, false, kAdamWDecay);
  }
  SECTION("state after three steps") {
    TestModel m;
    parallel::Parameter* p = m.Add("w", Shape{4}, parallel::ParamKind::kDense, parallel::ShardSpec{});
    SetValues(p->value, kP0);
    auto opt = Optimizer::Create(o, m.list, nullptr);
    REQUIRE(opt.ok());
    for (int s = 0; s < 3; ++s) {
      SetValues(p->grad, kGrads[s]);
      REQUIRE((*opt)->Step(kLr[s]).ok());
    }
    REQUIRE((*opt)->states().size() == 1);
    const ParamState& st = (*opt)->states()[0];
    CHECK(st.whole());
    CHECK(st.param == p);
    REQUIRE(st.Find("exp_avg") != nullptr);
    REQUIRE(st.Find("exp_avg_sq") != nullptr);
    CHECK(st.Find("momentum_buffer") == nullptr);
    CheckClose(ToVector(*st.Find("exp_avg")), kAdamWDecayExpAvg);
    CheckClose(ToVector(*st.Find("exp_avg_sq")), kAdamWDecayExpAvgSq);
    CHECK((*opt)->StateBytes() == 2 * 4 * 4);
  }
}

TEST_CASE("SGD matches hand-computed steps") {
  OptimizerOptions o;
  o.type = OptimizerType::kSgd;
  SECTION("plain") { RunThreeSteps(o, true, kSgd); }
  SECTION("weight decay (L2 added to the gradient)") {
    o.weight_decay = 0.1;
    RunThreeSteps(o, true, kSgdDecay);
    RunThreeSteps(o, false, kSgd);  // flag off: no decay
  }
  SECTION("momentum") {
    o.momentum = 0.9;
    RunThreeSteps(o, true, kSgdMomentum);
  }
  SECTION("momentum and weight decay") {
    o.momentum = 0.9;
    o.weight_decay = 0.1;
    RunThreeSteps(o, true, kSgdMomentumDecay);
  }
}

TEST_CASE("Step's grad_scale (clipping) equals scaling the gradients first") {
  // Three steps each way: the gradients scaled in place then Step(lr), and
  // Step(lr, scale) on the unscaled gradients, which it leaves unchanged.
  // AdamW bit for bit; SGD folds lr * scale into one factor (f32 rounding).
  const double scale[3] = {0.25, 1.0, 0.61};
  auto run_both = [&](const OptimizerOptions& o, double tol) {
    TestModel a, b;
    parallel::Parameter* pa = a.Add("w", Shape{2, 2}, parallel::ParamKind::kDense, parallel::ShardSpec{});
    parallel::Parameter* pb = b.Add("w", Shape{2, 2}, parallel::ParamKind::kDense, parallel::ShardSpec{});
    SetValues(pa->value, kP0);
    SetValues(pb->value, kP0);
    auto opt_a = Optimizer::Create(o, a.list, nullptr);
    auto opt_b = Optimizer::Create(o, b.list, nullptr);
    REQUIRE(opt_a.ok());
    REQUIRE(opt_b.ok());
    for (int s = 0; s < 3; ++s) {
      INFO("step " << s + 1);
      std::vector<float> scaled = kGrads[s];
      for (float& g : scaled) g *= static_cast<float>(scale[s]);
      SetValues(pa->grad, scaled);
      SetValues(pb->grad, kGrads[s]);
      REQUIRE((*opt_a)->Step(kLr[s]).ok());
      REQUIRE((*opt_b)->Step(kLr[s], scale[s]).ok());
      CHECK(ToVector(pb->grad) == kGrads[s]);
      const std::vector<float> va = ToVector(pa->value), vb = ToVector(pb->value);
      if (tol == 0) {
        CHECK(va == vb);
      } else {
        std::vector<double> want(va.begin(), va.end());
        CheckClose(vb, want, tol);
      }
    }
  };
  OptimizerOptions o;
  o.weight_decay = 0.1;
  SECTION("AdamW") { run_both(o, 0); }
  SECTION("SGD with momentum") {
    o.type = OptimizerType::kSgd;
    o.momentum = 0.9;
    run_both(o, 1e-6);
  }
  SECTION("SGD") {
    o.type = OptimizerType::kSgd;
    run_both(o, 1e-6);
  }
  SECTION("a scale that is not finite and positive is refused before any update") {
    TestModel m;
    parallel::Parameter* p = m.Add("w", Shape{4}, parallel::ParamKind::kDense, parallel::ShardSpec{});
    SetValues(p->value, kP0);
    auto opt = Optimizer::Create(o, m.list, nullptr);
    REQUIRE(opt.ok());
    for (double bad : {0.0, -1.0, std::nan(""), static_cast<double>(INFINITY)}) {
      absl::Status st = (*opt)->Step(0.1, bad);
      CHECK(st.code() == absl::StatusCode::kInvalidArgument);
      CHECK(std::string(st.message()).find("grad_scale") != std::string::npos);
      CHECK((*opt)->step() == 0);
      CHECK(ToVector(p->value) == kP0);
    }
  }
}

TEST_CASE("State names and memory category") {
  TestModel m;
  m.Add("a", Shape{3, 5}, parallel::ParamKind::kDense, parallel::ShardSpec{});
  m.Add("b", Shape{7}, parallel::ParamKind::kDense, parallel::ShardSpec{});
  const int64_t before = Cpu().memory().Stats(MemoryCategory::kOptimizer).live_bytes;
  OptimizerOptions o;
  {
    auto adam = Optimizer::Create(o, m.list, nullptr);
    REQUIRE(adam.ok());
    CHECK((*adam)->state_names() == std::vector<std::string>{"exp_avg", "exp_avg_sq"});
    CHECK((*adam)->StateBytes() == 2 * 22 * 4);
    CHECK(Cpu().memory().Stats(MemoryCategory::kOptimizer).live_bytes - before == 2 * 22 * 4);
    CHECK((*adam)->states()[0].Find("exp_avg")->shape() == Shape{3, 5});
  }
  CHECK(Cpu().memory().Stats(MemoryCategory::kOptimizer).live_bytes == before);
  o.type = OptimizerType::kSgd;
  auto sgd = Optimizer::Create(o, m.list, nullptr);
  REQUIRE(sgd.ok());
  CHECK((*sgd)->state_names().empty());
  CHECK((*sgd)->StateBytes() == 0);
  o.momentum = 0.5;
  auto sgdm = Optimizer::Create(o, m.list, nullptr);
  REQUIRE(sgdm.ok());
  CHECK((*sgdm)->state_names() == std::vector<std::string>{"momentum_buffer"});
}

// Fills grads of every parameter for step `s`.
void SetGrads(TestModel& m, int s) {
  for (auto& p : m.owned) testing::FillShard(*p, p->grad, 100 + s);
}

TEST_CASE("State save and load round trip continues bit-identically") {
  for (OptimizerType type : {OptimizerType::kAdamW, OptimizerType::kSgd}) {
    OptimizerOptions o;
    o.type = type;
    o.weight_decay = 0.05;
    o.momentum = 0.9;
    TestModel a, b;
    for (TestModel* m : {&a, &b}) {
      m->Add("x", Shape{4, 3}, parallel::ParamKind::kDense, parallel::ShardSpec{});
      m->Add("norm", Shape{3}, parallel::ParamKind::kDense, parallel::ShardSpec{}, false);
      m->Add("experts", Shape{2, 3, 2}, parallel::ParamKind::kExpert,
             parallel::FullShard(parallel::ParamKind::kExpert, Shape{2, 3, 2}));
      for (auto& p : m->owned) testing::FillShard(*p, p->value, 0);
    }
    auto opt_a = Optimizer::Create(o, a.list, nullptr);
    REQUIRE(opt_a.ok());
    for (int s = 0; s < 2; ++s) {
      SetGrads(a, s);
      REQUIRE((*opt_a)->Step(1e-2).ok());
    }
    // "Checkpoint": parameter values and states to host vectors.
    std::vector<std::vector<float>> saved_states;
    for (const ParamState& st : (*opt_a)->states()) {
      for (const auto& [name, t] : st.tensors) saved_states.push_back(ToVector(t));
    }
    for (size_t i = 0; i < a.owned.size(); ++i) SetValues(b.owned[i]->value, ToVector(a.owned[i]->value));
    auto opt_b = Optimizer::Create(o, b.list, nullptr);
    REQUIRE(opt_b.ok());
    size_t k = 0;
    for (const ParamState& st : (*opt_a)->states()) {
      for (const auto& [name, t] : st.tensors) {
        Tensor loaded = testing::HostTensor(Shape{t.numel()}, saved_states[k++], MemoryCategory::kOther);
        REQUIRE((*opt_b)->LoadState(st.param->name, name, loaded).ok());
      }
    }
    (*opt_b)->set_step((*opt_a)->step());
    SetGrads(a, 2);
    SetGrads(b, 2);
    REQUIRE((*opt_a)->Step(5e-3).ok());
    REQUIRE((*opt_b)->Step(5e-3).ok());
    for (size_t i = 0; i < a.owned.size(); ++i) {
      INFO((*opt_a)->type_name() << " " << a.owned[i]->name);
      CHECK(ToVector(a.owned[i]->value) == ToVector(b.owned[i]->value));
    }
    // Errors: unknown state, wrong size.
    Tensor small = testing::HostTensor(Shape{2}, {1, 2}, MemoryCategory::kOther);
    CHECK(absl::IsNotFound((*opt_b)->LoadState("x", "nope", small)));
    CHECK(absl::IsNotFound((*opt_b)->LoadState("nope", "momentum_buffer", small)));
    const std::string first_state = (*opt_b)->state_names()[0];
    absl::Status st = (*opt_b)->LoadState("x", first_state, small);
    CHECK(absl::IsInvalidArgument(st));
    CHECK_THAT(std::string(st.message()), Catch::Contains("12 elements"));
  }
}

TEST_CASE("Options from the config, and bad options") {
  config::JobConfig job;
  ApplyDefaults(1, &job);
  auto o = OptimizerOptionsFromConfig(job.optim());
  REQUIRE(o.ok());
  CHECK(o->type == OptimizerType::kAdamW);
  CHECK(o->beta2 == 0.95);
  CHECK(o->weight_decay == 0.1);
  CHECK_FALSE(o->decay_all);
  CHECK_FALSE(o->shard_state);
  job.mutable_optim()->set_type("lion");
  auto bad = OptimizerOptionsFromConfig(job.optim());
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("optim.type = \"lion\""));
  job.mutable_optim()->set_type("sgd");
  job.mutable_optim()->set_momentum(1.5);
  bad = OptimizerOptionsFromConfig(job.optim());
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("optim.momentum = 1.5"));
  job.mutable_optim()->set_momentum(0.9);
  job.mutable_optim()->set_decay_norms_and_embeddings(true);
  o = OptimizerOptionsFromConfig(job.optim());
  REQUIRE(o.ok());
  CHECK(o->type == OptimizerType::kSgd);
  CHECK(o->decay_all);

  // A parameter without a gradient tensor is refused with its name.
  parallel::Parameter p;
  p.name = "model.norm.weight";
  p.global_shape = Shape{4};
  auto v = Tensor::Zeros(Cpu(), Shape{4}, DType::kF32, MemoryCategory::kParameters);
  REQUIRE(v.ok());
  p.value = *v;
  parallel::ParameterList list;
  REQUIRE(list.Add(&p).ok());
  auto opt = Optimizer::Create(OptimizerOptions{}, list, nullptr);
  REQUIRE_FALSE(opt.ok());
  CHECK_THAT(std::string(opt.status().message()), Catch::Contains("model.norm.weight has no grad"));
  // ZeRO-1 needs process groups.
  OptimizerOptions zero;
  zero.shard_state = true;
  TestModel m;
  m.Add("w", Shape{2}, parallel::ParamKind::kDense, parallel::ShardSpec{});
  auto z = Optimizer::Create(zero, m.list, nullptr);
  REQUIRE_FALSE(z.ok());
  CHECK_THAT(std::string(z.status().message()), Catch::Contains("shard_state"));
}

TEST_CASE("LR schedule at key steps for each decay style") {
  const double lr = 1e-3, min_lr = 1e-4;
  auto cos = LrSchedule::Create(lr, min_lr, 10, 110, LrDecay::kCosine);
  REQUIRE(cos.ok());
  CHECK(cos->At(1) == Approx(1e-4).epsilon(1e-12));
  CHECK(cos->At(5) == Approx(5e-4).epsilon(1e-12));
  CHECK(cos->At(10) == Approx(1e-3).epsilon(1e-12));
  CHECK(cos->At(11) == Approx(1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI * 0.01))).epsilon(1e-12));
  CHECK(cos->At(35) == Approx(1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI * 0.25))).epsilon(1e-12));
  CHECK(cos->At(60) == Approx(5.5e-4).epsilon(1e-12));
  CHECK(cos->At(110) == Approx(1e-4).epsilon(1e-12));
  CHECK(cos->At(111) == 1e-4);
  CHECK(cos->At(1000) == 1e-4);

  auto lin = LrSchedule::Create(lr, min_lr, 10, 110, LrDecay::kLinear);
  REQUIRE(lin.ok());
  CHECK(lin->At(1) == Approx(1e-4).epsilon(1e-12));
  CHECK(lin->At(10) == Approx(1e-3).epsilon(1e-12));
  CHECK(lin->At(35) == Approx(1e-4 + 9e-4 * 0.75).epsilon(1e-12));
  CHECK(lin->At(60) == Approx(5.5e-4).epsilon(1e-12));
  CHECK(lin->At(110) == Approx(1e-4).epsilon(1e-12));
  CHECK(lin->At(200) == 1e-4);

  auto con = LrSchedule::Create(lr, min_lr, 4, 0, LrDecay::kConstant);
  REQUIRE(con.ok());
  CHECK(con->At(1) == Approx(2.5e-4).epsilon(1e-12));
  CHECK(con->At(4) == Approx(1e-3).epsilon(1e-12));
  CHECK(con->At(5) == 1e-3);
  CHECK(con->At(100000) == 1e-3);

  // No warmup: the first step already decays.
  auto nowarm = LrSchedule::Create(lr, 0.0, 0, 100, LrDecay::kLinear);
  REQUIRE(nowarm.ok());
  CHECK(nowarm->At(1) == Approx(lr * 0.99).epsilon(1e-12));
  CHECK(nowarm->At(50) == Approx(lr * 0.5).epsilon(1e-12));
  CHECK(nowarm->At(100) == 0.0);

  // From the config (defaults: cosine, min_lr = 0.1 lr, decay_steps = train.steps).
  config::JobConfig job;
  job.mutable_train()->set_steps(200);
  job.mutable_optim()->set_lr(2e-3);
  job.mutable_optim()->set_warmup_steps(20);
  ApplyDefaults(1, &job);
  auto from = LrSchedule::FromConfig(job.optim());
  REQUIRE(from.ok());
  CHECK(from->decay() == LrDecay::kCosine);
  CHECK(from->At(20) == Approx(2e-3).epsilon(1e-12));
  CHECK(from->At(110) == Approx(2e-4 + 1.8e-3 * 0.5).epsilon(1e-12));
  CHECK(from->At(200) == Approx(2e-4).epsilon(1e-12));

  // Bad schedules name the field.
  auto bad = LrSchedule::Create(lr, min_lr, 100, 50, LrDecay::kCosine);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("optim.decay_steps = 50"));
  bad = LrSchedule::Create(lr, 2e-3, 0, 50, LrDecay::kLinear);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(std::string(bad.status().message()), Catch::Contains("optim.min_lr"));
  CHECK_FALSE(ParseLrDecay("step").ok());
}

}  // namespace
}  // namespace moe::optim
