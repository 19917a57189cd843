// Helpers of the multi-rank checkpoint tests: a synthetic sharded model (every
// kind of parameter of docs/model.md's MoE layer) with an AdamW optimizer, plain or
// ZeRO-1, whose values are a deterministic function of (name, global index,
// salt), so any layout can check what it loaded exactly.
#ifndef MOE_TESTS_RUNTIME_CHECKPOINT_TEST_UTIL_H_
#define MOE_TESTS_RUNTIME_CHECKPOINT_TEST_UTIL_H_

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "optim/optimizer.h"
#include "parallel/parameter.h"
#include "parallel/process_groups.h"
#include "runtime/checkpoint.h"
#include "runtime/core/backend.h"
#include "runtime/core/tensor.h"

namespace moe::testing {

// The job's world communicator (created once).
inline comm::Communicator& World() {
  static std::unique_ptr<comm::Communicator> world = [] {
    comm::CommOptions options;
    options.backend = "mpi";
    options.timeout_s = 120;
    auto w = comm::CreateWorldCommunicator(options);
    REQUIRE(w.ok());
    return std::move(*w);
  }();
  return *world;
}

inline void WorldBarrier() {
  auto w = World().Barrier();
  REQUIRE(w.ok());
  REQUIRE(w->Wait().ok());
}

// Process groups of layout (tp, ep) over the first `world_size` ranks; empty
// (world == nullptr) on the others. Collective over World().
inline parallel::ProcessGroups GroupsOver(int world_size, int tp, int ep) {
  const int rank = World().rank();
  auto sub = World().Split(rank < world_size ? 0 : comm::kNoColor, rank, absl::StrCat("sub", world_size));
  REQUIRE(sub.ok());
  if (*sub == nullptr) return {};
  auto groups = parallel::CreateProcessGroups(std::move(*sub), tp, ep);
  INFO(groups.status().ToString());
  REQUIRE(groups.ok());
  return std::move(*groups);
}

// A directory every rank agrees on (rank 0's pid), emptied by rank 0.
inline std::string SharedTempDir(const std::string& name) {
  int64_t pid = ::getpid();
  auto w = World().Broadcast(&pid, &pid, 1, DType::kI64, 0);
  REQUIRE(w.ok());
  REQUIRE(w->Wait().ok());
  const std::string dir = (std::filesystem::temp_directory_path() /
                           absl::StrCat("moe_ckpt_", name, "_np", World().size(), "_", pid))
                              .string();
  if (World().rank() == 0) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  WorldBarrier();
  return dir;
}

inline Backend& Cpu() {
  auto b = GetBackend(Device::Cpu());
  REQUIRE(b.ok());
  return **b;
}

// Element `index` of global tensor `name` under `salt`: exact in f32.
inline float GlobalValue(const std::string& name, int64_t index, int salt) {
  uint32_t h = 2166136261u;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return static_cast<float>((h % 97) * 16 + (index % 1021) * 0.25 + salt * 0.125) *
         ((index + salt) % 3 == 0 ? -1 : 1);
}

// Global flat index of every element of the local tensor of (global_shape, shard).
inline std::vector<int64_t> LocalToGlobal(const Shape& global_shape, const parallel::ShardSpec& shard) {
  std::vector<int64_t> out(parallel::LocalShape(global_shape, shard).numel());
  parallel::ForEachLocalRun(global_shape, shard, [&](int64_t g, int64_t l, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[l + j] = g + j;
  });
  return out;
}

struct SynthModel {
  std::vector<std::unique_ptr<parallel::Parameter>> owned;
  parallel::ParameterList list;
  std::unique_ptr<optim::Optimizer> optimizer;

  std::vector<ShardedTensor> Tensors() const {
    std::vector<ShardedTensor> t = ModelTensors(list);
    AppendOptimizerTensors(*optimizer, list, t);
    return t;
  }
};

// Canonical names of a one-MoE-layer model; sizes divisible by tp <= 4 and ep <= 4.
inline void BuildModel(SynthModel& m, const parallel::ProcessGroups& groups, bool zero, int64_t scale = 1) {
  using parallel::ParamKind;
  const parallel::RankLayout& l = groups.layout;
  const int64_t V = 16 * scale, d = 8 * scale, E = 4, Fe = 12 * scale;
  auto tp = [&](const Shape& g, int dim, parallel::ShardSpec s = {}) {
    const int64_t n = g[dim] / l.tp;
    s.tp_dim = dim;
    s.tp_begin = l.tp_rank * n;
    s.tp_end = (l.tp_rank + 1) * n;
    return s;
  };
  auto experts = [&](const Shape& g) {
    parallel::ShardSpec s;
    s.expert_begin = l.ep_rank * (g[0] / l.ep);
    s.expert_end = (l.ep_rank + 1) * (g[0] / l.ep);
    return s;
  };
  auto add = [&](const std::string& name, const Shape& g, ParamKind kind, parallel::ShardSpec s) {
    auto p = std::make_unique<parallel::Parameter>();
    p->name = name;
    p->global_shape = g;
    p->kind = kind;
    p->shard = s;
    const Shape local = parallel::LocalShape(g, s);
    p->value = Tensor::Zeros(Cpu(), local, DType::kF32, MemoryCategory::kParameters).value();
    p->grad = Tensor::Zeros(Cpu(), local, DType::kF32, MemoryCategory::kGradients).value();
    REQUIRE(m.list.Add(p.get()).ok());
    m.owned.push_back(std::move(p));
  };
  const Shape embed{V, d}, norm{d}, q{d, d}, o{d, d}, router{E, d}, gate{E, Fe, d}, up{E, Fe, d},
      down{E, d, Fe};
  add("model.embed_tokens.weight", embed, ParamKind::kDense, tp(embed, 0));
  add("model.layers.0.input_layernorm.weight", norm, ParamKind::kDense, {});
  add("model.layers.0.self_attn.q_proj.weight", q, ParamKind::kDense, tp(q, 0));
  add("model.layers.0.self_attn.o_proj.weight", o, ParamKind::kDense, tp(o, 1));
  add("model.layers.0.mlp.router.weight", router, ParamKind::kDense, {});
  add("model.layers.0.mlp.experts.gate_proj", gate, ParamKind::kExpert, tp(gate, 1, experts(gate)));
  add("model.layers.0.mlp.experts.up_proj", up, ParamKind::kExpert, experts(up));  // TP-replicated
  add("model.layers.0.mlp.experts.down_proj", down, ParamKind::kExpert, tp(down, 2, experts(down)));
  add("model.norm.weight", norm, ParamKind::kDense, {});
  add("lm_head.weight", embed, ParamKind::kDense, tp(embed, 0));
  optim::OptimizerOptions options;
  options.shard_state = zero;
  auto opt = optim::Optimizer::Create(options, m.list, &groups);
  INFO(opt.status().ToString());
  REQUIRE(opt.ok());
  m.optimizer = std::move(*opt);
}

// Every parameter value (salt) and optimizer state (salt + 1 + state index)
// from GlobalValue; `sentinel` instead fills them all with one value.
inline void FillModel(SynthModel& m, int salt, const float* sentinel = nullptr) {
  for (parallel::Parameter* p : m.list) {
    const std::vector<int64_t> g = LocalToGlobal(p->global_shape, p->shard);
    float* v = p->value.data<float>();
    for (size_t i = 0; i < g.size(); ++i) v[i] = sentinel ? *sentinel : GlobalValue(p->name, g[i], salt);
  }
  for (const optim::ParamState& s : m.optimizer->states()) {
    const std::vector<int64_t> g = LocalToGlobal(s.param->global_shape, s.param->shard);
    for (size_t k = 0; k < s.tensors.size(); ++k) {
      float* v = s.tensors[k].second.data<float>();
      const std::string name = OptimizerStateName(s.tensors[k].first, s.param->name);
      for (int64_t i = s.begin; i < s.end; ++i) {
        v[i - s.begin] = sentinel ? *sentinel : GlobalValue(name, g[i], salt + 1 + static_cast<int>(k));
      }
    }
  }
}

// Number of elements that differ from FillModel(salt); prints the first few.
inline int64_t CountMismatches(const SynthModel& m, int salt) {
  int64_t bad = 0;
  auto check = [&](const std::string& name, float got, float want) {
    if (got == want) return;
    if (bad++ < 5) UNSCOPED_INFO(name << ": got " << got << ", want " << want);
  };
  for (parallel::Parameter* p : m.list) {
    const std::vector<int64_t> g = LocalToGlobal(p->global_shape, p->shard);
    const float* v = p->value.data<float>();
    for (size_t i = 0; i < g.size(); ++i) check(p->name, v[i], GlobalValue(p->name, g[i], salt));
  }
  for (const optim::ParamState& s : m.optimizer->states()) {
    const std::vector<int64_t> g = LocalToGlobal(s.param->global_shape, s.param->shard);
    for (size_t k = 0; k < s.tensors.size(); ++k) {
      const float* v = s.tensors[k].second.data<float>();
      const std::string name = OptimizerStateName(s.tensors[k].first, s.param->name);
      for (int64_t i = s.begin; i < s.end; ++i) {
        check(name, v[i - s.begin], GlobalValue(name, g[i], salt + 1 + static_cast<int>(k)));
      }
    }
  }
  return bad;
}

// A checkpointer of `g` writing under `dir` with a 120 s deadline; `o` sets the
// other options (fs, keep_last, async, partial_load).
inline std::unique_ptr<Checkpointer> MakeCheckpointer(const parallel::ProcessGroups& g,
                                                      const std::string& dir, CheckpointOptions o = {}) {
  o.dir = dir;
  if (o.timeout_s == 0) o.timeout_s = 120;
  auto c = Checkpointer::Create(*g.world, g.layout, o);
  INFO(c.status().ToString());
  REQUIRE(c.ok());
  return std::move(*c);
}

// Flips the lowest bit of the byte at `offset` of `path` in place.
inline void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(f.good());
  f.seekg(static_cast<std::streamoff>(offset));
  const char c = static_cast<char>(f.get());
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x01));
  REQUIRE(f.good());
}

inline TrainState SampleTrainState(int64_t step) {
  TrainState s;
  s.step = step;
  s.consumed_samples = step * 32;
  s.sampler_state = {3, step * 32 + 5};
  s.rng = {{"init", 1234, 0}, {"data", 99, static_cast<uint64_t>(step) * 7}};
  s.lr_step = step;
  s.int_values["optimizer.step"] = step;
  s.double_values["loss_scale"] = 0.1 + step;
  return s;
}

}  // namespace moe::testing

#endif  // MOE_TESTS_RUNTIME_CHECKPOINT_TEST_UTIL_H_
