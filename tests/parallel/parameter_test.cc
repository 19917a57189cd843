#include "parallel/parameter.h"

#include <catch2/catch.hpp>
#include <vector>

namespace moe::parallel {
namespace {

// Global row-major index of every local element, by brute force over the box.
std::vector<int64_t> NaiveGlobalIndices(const Shape& g, const ShardSpec& s) {
  std::vector<int64_t> b(g.rank(), 0), e(g.begin(), g.end());
  if (s.expert_end > s.expert_begin) b[0] = s.expert_begin, e[0] = s.expert_end;
  if (s.tp_dim >= 0) b[s.tp_dim] = s.tp_begin, e[s.tp_dim] = s.tp_end;
  std::vector<int64_t> out;
  std::vector<int64_t> idx = b;
  while (true) {
    int64_t off = 0;
    for (int i = 0; i < g.rank(); ++i) off = off * g[i] + idx[i];
    out.push_back(off);
    int i = g.rank() - 1;
    while (i >= 0 && ++idx[i] == e[i]) idx[i] = b[i], --i;
    if (i < 0) break;
  }
  return out;
}

std::vector<int64_t> RunIndices(const Shape& g, const ShardSpec& s) {
  std::vector<int64_t> out;
  int64_t expect_local = 0;
  ForEachLocalRun(g, s, [&](int64_t goff, int64_t loff, int64_t len) {
    CHECK(loff == expect_local);
    expect_local += len;
    for (int64_t j = 0; j < len; ++j) out.push_back(goff + j);
  });
  return out;
}

TEST_CASE("ForEachLocalRun covers exactly the shard's elements in local order") {
  const Shape g3{5, 6, 7};
  std::vector<std::pair<ParamKind, ShardSpec>> cases;
  cases.push_back({ParamKind::kDense, ShardSpec{}});
  cases.push_back({ParamKind::kDense, ShardSpec{0, 2, 4, 0, 0}});
  cases.push_back({ParamKind::kDense, ShardSpec{1, 1, 5, 0, 0}});
  cases.push_back({ParamKind::kDense, ShardSpec{2, 3, 7, 0, 0}});
  cases.push_back({ParamKind::kExpert, ShardSpec{-1, 0, 0, 1, 4}});
  cases.push_back({ParamKind::kExpert, ShardSpec{2, 0, 3, 2, 5}});
  cases.push_back({ParamKind::kExpert, ShardSpec{1, 4, 6, 0, 5}});
  for (auto& [kind, s] : cases) {
    REQUIRE(ValidateShard("p", kind, g3, s).ok());
    auto naive = NaiveGlobalIndices(g3, s);
    CHECK(RunIndices(g3, s) == naive);
    CHECK(LocalShape(g3, s).numel() == static_cast<int64_t>(naive.size()));
  }
  // Rank 1 and 2 tensors.
  CHECK(RunIndices(Shape{9}, ShardSpec{0, 3, 8, 0, 0}) == std::vector<int64_t>{3, 4, 5, 6, 7});
  CHECK(RunIndices(Shape{3, 4}, ShardSpec{1, 1, 3, 0, 0}) == std::vector<int64_t>{1, 2, 5, 6, 9, 10});
}

TEST_CASE("Shard validation names the parameter and the numbers") {
  const Shape g{8, 4, 6};
  auto st =
      ValidateShard("model.layers.0.mlp.experts.up_proj", ParamKind::kExpert, g, ShardSpec{-1, 0, 0, 6, 10});
  REQUIRE(!st.ok());
  CHECK(std::string(st.message()).find("experts.up_proj") != std::string::npos);
  CHECK(std::string(st.message()).find("[6, 10)") != std::string::npos);
  CHECK(!ValidateShard("w", ParamKind::kExpert, g, ShardSpec{0, 0, 4, 0, 8}).ok());
  CHECK(!ValidateShard("w", ParamKind::kDense, g, ShardSpec{3, 0, 1, 0, 0}).ok());
  CHECK(!ValidateShard("w", ParamKind::kDense, g, ShardSpec{-1, 0, 0, 0, 2}).ok());
  CHECK(ValidateShard("w", ParamKind::kExpert, g, FullShard(ParamKind::kExpert, g)).ok());
  CHECK(ShardOffsets(g, ShardSpec{2, 3, 6, 4, 8}) == std::vector<int64_t>{4, 0, 3});
  CHECK(ShardOffsets(g, ShardSpec{}) == std::vector<int64_t>{0, 0, 0});
}

TEST_CASE("ParameterList keeps order, rejects duplicates and counts elements") {
  auto make = [](std::string name, Shape shape, ParamKind kind, ShardSpec shard) {
    Parameter p;
    p.name = std::move(name);
    p.global_shape = shape;
    p.kind = kind;
    p.shard = shard;
    return p;
  };
  Parameter a = make("model.embed_tokens.weight", Shape{10, 4}, ParamKind::kDense, {});
  Parameter b = make("model.layers.0.mlp.experts.gate_proj", Shape{4, 3, 4}, ParamKind::kExpert,
                     ShardSpec{-1, 0, 0, 2, 4});
  Parameter c = make("model.norm.weight", Shape{4}, ParamKind::kDense, {});
  ParameterList list;
  REQUIRE(list.Add(&a).ok());
  REQUIRE(list.Add(&b).ok());
  REQUIRE(list.Add(&c).ok());
  CHECK(!list.Add(&a).ok());
  CHECK(list.size() == 3);
  CHECK(list[1] == &b);
  CHECK(list.Find("model.norm.weight") == &c);
  CHECK(list.Find("lm_head.weight") == nullptr);
  CHECK(list.LocalNumel() == 40 + 24 + 4);
  CHECK(list.LocalNumel(ParamKind::kExpert) == 24);
  CHECK(list.GlobalNumel() == 40 + 48 + 4);
  CHECK(b.is_sharded());
  CHECK(!a.is_sharded());
  CHECK(b.reduce_group() == GradReduceGroup::kExpertDataParallel);
  CHECK(a.reduce_group() == GradReduceGroup::kDataParallel);
  CHECK(!DefaultWeightDecay("model.embed_tokens.weight"));
  CHECK(!DefaultWeightDecay("model.layers.3.post_attention_layernorm.weight"));
  CHECK(!DefaultWeightDecay("model.norm.weight"));
  CHECK(DefaultWeightDecay("lm_head.weight"));
  CHECK(DefaultWeightDecay("model.layers.0.mlp.router.weight"));
}

}  // namespace
}  // namespace moe::parallel
