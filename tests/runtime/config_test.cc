#include "runtime/core/config.h"

#include <catch2/catch.hpp>
#include <string>

#include "runtime/core/device_select.h"
#include "runtime/job_config.h"

namespace moe {
namespace {

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

JobConfig Resolved(const std::string& text, int world, std::vector<std::string> overrides = {}) {
  JobConfig c = ParseConfigText(text, "test.textproto").value();
  REQUIRE(ApplyOverrides(overrides, &c).ok());
  if (!c.data().has_train_path()) c.mutable_data()->set_train_path("corpus");  // required by validation
  ApplyDefaults(world, &c);
  return c;
}

std::string Problems(const JobConfig& c, int world) {
  std::string all;
  for (const auto& p : ValidateJobConfig(c, world)) all += p + "\n";
  return all;
}

TEST_CASE("the demo config parses and validates on 4 ranks") {
  JobConfig c = LoadConfigFile(MOE_SOURCE_DIR "/configs/demo.textproto").value();
  ApplyDefaults(4, &c);
  CHECK(Problems(c, 4).empty());
  CHECK(c.parallel().data() == 4);
  CHECK(c.model().moe().num_experts() == 8);
  CHECK(c.model().moe().norm_topk_prob());  // default applied
}

TEST_CASE("defaults fill every unset field, explicit zeros stay") {
  JobConfig c = Resolved("model { moe { capacity_factor: 0 } } optim { weight_decay: 0 }", 2);
  CHECK(c.model().hidden_size() == 128);
  CHECK(c.model().num_kv_heads() == c.model().num_heads());
  CHECK(c.model().moe().expert_ffn_hidden_size() == c.model().ffn_hidden_size());
  CHECK(c.optim().weight_decay() == 0.0);
  CHECK(c.optim().decay_steps() == c.train().steps());
  CHECK(c.comm().timeout_s() == 600.0);
  CHECK(c.parallel().data() == 2);
}

TEST_CASE("parse errors carry file:line:column") {
  auto unknown = ParseConfigText("model {\n  hiden_size: 3\n}\n", "bad.textproto");
  REQUIRE_FALSE(unknown.ok());
  CHECK(Contains(std::string(unknown.status().message()), "bad.textproto:2:"));
  CHECK(Contains(std::string(unknown.status().message()), "hiden_size"));
  auto malformed = ParseConfigText("train { steps: ten }", "m.textproto");
  REQUIRE_FALSE(malformed.ok());
  CHECK(Contains(std::string(malformed.status().message()), "m.textproto:1:"));
  auto missing = LoadConfigFile("/nonexistent/x.textproto");
  REQUIRE_FALSE(missing.ok());
  CHECK(Contains(std::string(missing.status().message()), "--config"));
}

TEST_CASE("overrides set scalars with type checks") {
  JobConfig c;
  REQUIRE(ApplyOverride("model.hidden_size=256", &c).ok());
  REQUIRE(ApplyOverride("model.moe.capacity_factor=1.25", &c).ok());
  REQUIRE(ApplyOverride("train.run_dir=runs/x", &c).ok());
  REQUIRE(ApplyOverride("model.tie_word_embeddings=true", &c).ok());
  REQUIRE(ApplyOverride("train.seed=42", &c).ok());
  CHECK(c.model().hidden_size() == 256);
  CHECK(c.model().moe().capacity_factor() == 1.25);
  CHECK(c.train().run_dir() == "runs/x");
  CHECK(c.model().tie_word_embeddings());
  CHECK(c.train().seed() == 42u);

  auto bad_int = ApplyOverride("model.hidden_size=big", &c);
  CHECK(bad_int.message() ==
        "override 'model.hidden_size=big': model.hidden_size takes an integer, not 'big'");
  auto bad_field = ApplyOverride("model.hiden_size=3", &c);
  CHECK(Contains(std::string(bad_field.message()), "model has no field 'hiden_size'"));
  auto message = ApplyOverride("model.moe=3", &c);
  CHECK(Contains(std::string(message.message()), "is a message, not a scalar"));
  auto no_eq = ApplyOverride("train.steps", &c);
  CHECK(Contains(std::string(no_eq.message()), "field.path=value"));
  auto bad_bool = ApplyOverride("llep.enabled=maybe", &c);
  CHECK(Contains(std::string(bad_bool.message()), "takes true or false"));
  auto negative_uint = ApplyOverride("train.seed=-1", &c);
  CHECK_FALSE(negative_uint.ok());
  // All bad overrides are reported at once.
  auto many = ApplyOverrides({"a.b=1", "train.steps=x"}, &c);
  CHECK(Contains(std::string(many.message()), "a.b=1"));
  CHECK(Contains(std::string(many.message()), "train.steps=x"));
}

TEST_CASE("every validation message names field, value and fix") {
  SECTION("expert must divide experts") {
    auto p = Problems(Resolved("parallel { expert: 3 }", 6), 6);
    CHECK(Contains(p, "parallel.expert = 3 must divide model.moe.num_experts = 8"));
  }
  SECTION("tensor must divide heads") {
    auto p = Problems(Resolved("model { num_heads: 6 hidden_size: 132 } parallel { tensor: 4 }", 8), 8);
    CHECK(Contains(p, "parallel.tensor = 4 must divide model.num_heads = 6"));
  }
  SECTION("the issue's example: tensor 2 and 6 heads") {
    auto p = Problems(
        Resolved("model { num_heads: 6 hidden_size: 120 num_kv_heads: 3 } parallel { tensor: 2 }", 2), 2);
    CHECK(Contains(p, "parallel.tensor = 2 must divide model.num_kv_heads = 3"));
    auto q = Problems(Resolved("model { num_heads: 3 hidden_size: 96 } parallel { tensor: 2 }", 2), 2);
    CHECK(Contains(q, "parallel.tensor = 2 must divide model.num_heads = 3"));
  }
  SECTION("world size must be tensor x data") {
    auto p = Problems(Resolved("parallel { tensor: 2 data: 4 }", 6), 6);
    CHECK(Contains(p, "world size 6 is not parallel.tensor x parallel.data = 2 x 4"));
  }
  SECTION("tensor must divide world") {
    auto p = Problems(Resolved("parallel { tensor: 4 }", 6), 6);
    CHECK(Contains(p, "parallel.tensor = 4 must divide the world size 6"));
  }
  SECTION("precision") {
    auto p = Problems(Resolved("train { precision: \"fp16\" }", 1), 1);
    CHECK(Contains(p, "train.precision = \"fp16\" must be \"fp32\" or \"bf16\""));
    CHECK(Problems(Resolved("train { precision: \"bf16\" }", 1), 1).empty());
    CHECK(Resolved("", 1).train().precision() == "fp32");
  }
  SECTION("kv heads and top-k") {
    auto p = Problems(Resolved("model { num_kv_heads: 3 moe { top_k: 9 } }", 1), 1);
    CHECK(Contains(p, "model.num_kv_heads = 3 must divide model.num_heads = 4"));
    CHECK(Contains(p, "model.moe.top_k = 9 must be at most model.moe.num_experts = 8"));
  }
  SECTION("forced routing hot experts outside the expert range") {
    auto p = Problems(
        Resolved("model { moe { forced_routing { fraction: 0.5 hot_experts: 2 first_hot_expert: 7 } } }", 1),
        1);
    CHECK(Contains(p,
                   "model.moe.forced_routing.first_hot_expert = 7 with hot_experts = 2 must keep the hot "
                   "experts within [0, 8)"));
    CHECK(Problems(Resolved("model { moe { forced_routing { fraction: 0.5 first_hot_expert: 7 } } }", 1), 1)
              .empty());
  }
  SECTION("enumerations") {
    auto p = Problems(Resolved("optim { type: \"lion\" } model { moe { drop_policy: \"random\" } }", 1), 1);
    CHECK(Contains(p, "optim.type = \"lion\" must be \"adamw\" or \"sgd\""));
    CHECK(Contains(p, "model.moe.drop_policy = \"random\" must be \"probs\" or \"position\""));
  }
  SECTION("a device this build cannot train on") {
    auto p = Problems(Resolved("train { device: \"cuda\" }", 1), 1);
    if (BuiltWithCuda()) {
      CHECK(p.empty());  // whether a GPU is there is the trainer's check
      CHECK(Contains(Problems(Resolved("train { device: \"cuda:x\" }", 1), 1),
                     "train.device = \"cuda:x\" is not one of"));
    } else {
      CHECK(Contains(p, "train.device = \"cuda\": this build trains on \"cpu\" only"));
    }
  }
  SECTION("comm.backend follows train.device") {
    auto p = Problems(Resolved("comm { backend: \"nccl\" }", 1), 1);
    CHECK(Contains(p, "comm.backend = \"nccl\" moves device buffers, but train.device = \"cpu\""));
    CHECK(Contains(p, "set comm.backend = \"mpi\" or \"auto\""));
    CHECK(Problems(Resolved("comm { backend: \"mpi\" }", 1), 1).empty());
    CHECK(Problems(Resolved("comm { backend: \"auto\" }", 1), 1).empty());
    // mpi with cuda is allowed: the only problem is the device a CPU-only build lacks.
    JobConfig cuda_mpi = Resolved("train { device: \"cuda\" } comm { backend: \"mpi\" }", 1);
    CHECK(ValidateJobConfig(cuda_mpi, 1).size() == (BuiltWithCuda() ? 0u : 1u));
    CHECK(!Contains(Problems(cuda_mpi, 1), "comm.backend"));
  }
  SECTION("every problem is reported at once") {
    auto problems = ValidateJobConfig(
        Resolved("parallel { expert: 3 } optim { lr: -1 } train { device: \"tpu\" }", 6), 6);
    const std::string p =
        Problems(Resolved("parallel { expert: 3 } optim { lr: -1 } train { device: \"tpu\" }", 6), 6);
    CHECK(Contains(p, "parallel.expert = 3 must divide model.moe.num_experts = 8"));
    CHECK(Contains(p, "optim.lr = -1 must be positive"));
    // A CPU-only build and a CUDA build word the refusal differently.
    CHECK((Contains(p, "train.device = \"tpu\": this build trains on \"cpu\" only") ||
           Contains(p, "train.device = \"tpu\" is not one of \"cpu\", \"cuda\", \"cuda:N\"")));
    CHECK(problems.size() == 4);  // and optim.min_lr, now above optim.lr
    CHECK(Contains(p, "optim.min_lr = "));
  }
  SECTION("non-positive sizes") {
    auto p = Problems(Resolved("model { hidden_size: 0 } train { micro_batch: -2 }", 1), 1);
    CHECK(Contains(p, "model.hidden_size = 0 must be positive"));
    CHECK(Contains(p, "train.micro_batch = -2 must be positive"));
  }
}

// One rule per case: the message names the field, the value and the rule, and
// it is the only problem of a config that is valid without the change.
TEST_CASE("each rule's message, alone: llep, comm, checkpoint, optim, experts_impl, layout") {
  struct Case {
    const char* text;
    int world;
    const char* message;
  };
  const Case cases[] = {
      {"llep { trigger_ratio: 0.5 }", 1, "llep.trigger_ratio = 0.5 must be >= 1 (max/mean load; paper: 1.3)"},
      {"llep { capacity_factor: 0.9 }", 1, "llep.capacity_factor = 0.9 must be >= 1 (paper: 1.0)"},
      {"llep { min_tokens_per_gemm: 0 }", 1, "llep.min_tokens_per_gemm = 0 must be >= 1 (paper: 1024)"},
      {"llep { max_borrowed_experts: -1 }", 1, "llep.max_borrowed_experts = -1 must be >= 0 (0: no limit)"},
      {"comm { timeout_s: -1 }", 1, "comm.timeout_s = -1 must be positive"},
      {"comm { backend: \"gloo\" }", 1, "comm.backend = \"gloo\" must be \"auto\", \"mpi\" or \"nccl\""},
      {"checkpoint { save_every: -5 }", 1, "checkpoint.save_every = -5 must be >= 0"},
      {"checkpoint { keep_last: -1 }", 1, "checkpoint.keep_last = -1 must be >= 0 (0: keep all)"},
      {"checkpoint { host_bucket_mb: 0 }", 1,
       "checkpoint.host_bucket_mb = 0 must be > 0 (MiB of host memory"},
      {"optim { beta1: 1 }", 1, "optim.beta1 = 1 must be in [0, 1)"},
      {"optim { beta2: -0.5 }", 1, "optim.beta2 = -0.5 must be in [0, 1)"},
      {"optim { eps: 0 }", 1, "optim.eps = 0 must be positive"},
      {"optim { lr: 0.001 min_lr: 0.01 }", 1, "optim.min_lr = 0.01 must be in [0, optim.lr = 0.001]"},
      {"optim { min_lr: -1 }", 1, "optim.min_lr = -1 must be in [0, optim.lr = "},
      {"optim { lr_schedule: \"step\" }", 1,
       "optim.lr_schedule = \"step\" must be \"cosine\", \"linear\" or \"constant\""},
      {"optim { lr_schedule: \"linear\" warmup_steps: 50 decay_steps: 40 }", 1,
       "optim.decay_steps = 40 must exceed optim.warmup_steps = 50 for the linear schedule"},
      {"model { moe { experts_impl: \"fast\" } }", 1,
       "model.moe.experts_impl = \"fast\" must be \"grouped\" or \"sequential\""},
      {"model { hidden_size: 12 num_heads: 4 num_kv_heads: 2 }", 1,
       "head size model.hidden_size / model.num_heads = 3 must be even for RoPE"},
      {"parallel { expert: 4 data: 6 }", 6,
       "parallel.expert = 4 must divide parallel.data = 6 (expert groups are slices of the data-parallel "
       "dimension)"},
      {"model { ffn_hidden_size: 66 } parallel { tensor: 4 }", 4,
       "parallel.tensor = 4 must divide model.ffn_hidden_size = 66"},
  };
  // The base config is valid at each world size used.
  for (int world : {1, 4, 6}) CHECK(Problems(Resolved("", world), world).empty());
  for (const Case& c : cases) {
    CAPTURE(c.text, c.world);
    const std::vector<std::string> problems = ValidateJobConfig(Resolved(c.text, c.world), c.world);
    REQUIRE(problems.size() == 1);
    CAPTURE(problems[0]);
    CHECK(Contains(problems[0], c.message));
  }
}

TEST_CASE("ResolveJobConfig reports file, overrides and validation") {
  auto r = ResolveJobConfig(MOE_SOURCE_DIR "/configs/demo.textproto", {"parallel.expert=3"}, 4);
  REQUIRE_FALSE(r.ok());
  CHECK(Contains(std::string(r.status().message()),
                 "parallel.expert = 3 must divide model.moe.num_experts = 8"));
  auto ok = ResolveJobConfig(MOE_SOURCE_DIR "/configs/demo.textproto", {"train.steps=50"}, 4);
  REQUIRE(ok.ok());
  CHECK(ok->train().steps() == 50);
  CHECK(ok->optim().decay_steps() == 50);
  auto short_run = ResolveJobConfig(MOE_SOURCE_DIR "/configs/demo.textproto", {"train.steps=7"}, 4);
  REQUIRE_FALSE(short_run.ok());
  CHECK(Contains(std::string(short_run.status().message()),
                 "optim.decay_steps = 7 must exceed optim.warmup_steps = 40"));
}

TEST_CASE("IsMoeLayer follows l % n == n - 1") {
  config::ModelConfig m;
  m.mutable_moe()->set_moe_layer_freq(2);
  CHECK_FALSE(IsMoeLayer(m, 0));
  CHECK(IsMoeLayer(m, 1));
  CHECK_FALSE(IsMoeLayer(m, 2));
  CHECK(IsMoeLayer(m, 3));
  m.mutable_moe()->set_moe_layer_freq(1);
  CHECK(IsMoeLayer(m, 0));
}

}  // namespace
}  // namespace moe
