// The checkpoint plan (runtime/checkpoint_plan.h) without MPI or files: every
// rank of a simulated (world, tp, ep) layout, with ZeRO-1 on or off, lists
// what it holds; the save plan must write every element exactly once, by a
// holder; its manifest must pass ValidateManifest; and a load into another
// layout, executed in memory from the saved shards (reads, then the replica
// transfers paired send-to-receive), must give every rank exactly its part of
// every global tensor.
#include "runtime/checkpoint_plan.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "model/common.h"
#include "parallel/layout.h"
#include "runtime/checkpoint_format.h"

namespace moe {
namespace {

// What one rank holds of one tensor.
struct Holding {
  parallel::ShardSpec shard;
  int64_t flat_begin = 0, flat_end = -1;
};

struct SimTensor {
  TensorInfo info;
  bool expert = false;
  // kind of parameter: 0 replicated, 1 column-parallel, 2 row-parallel, 3 experts
  int kind = 0;
};

// A tiny model's parameters (every kind of sharding) and, per parameter, an
// optimizer state with the same name under optimizer/exp_avg/.
std::vector<SimTensor> Params() {
  return {{{"model.embed_tokens.weight", Shape{6, 4}}, false, 0},
          {{"model.layers.0.self_attn.q_proj.weight", Shape{8, 4}}, false, 1},
          {{"model.layers.0.self_attn.o_proj.weight", Shape{4, 8}}, false, 2},
          {{"model.layers.0.mlp.router.weight", Shape{4, 4}}, false, 0},
          {{"model.layers.0.mlp.experts.up_proj", Shape{4, 3, 2}}, true, 3},
          {{"model.norm.weight", Shape{4}}, false, 0}};
}

parallel::ShardSpec SpecOf(const SimTensor& t, const parallel::RankLayout& l) {
  model::ShardPlan plan;
  plan.tp_size = l.tp;
  plan.tp_rank = l.tp_rank;
  plan.ep_size = l.ep;
  plan.ep_rank = l.ep_rank;
  switch (t.kind) {
    case 1:
      return model::ColumnParallelShard(t.info.global_shape[0], plan);
    case 2:
      return model::RowParallelShard(t.info.global_shape[1], plan);
    case 3: {
      parallel::ShardSpec s;
      s.expert_begin = plan.expert_begin(t.info.global_shape[0]);
      s.expert_end = plan.expert_end(t.info.global_shape[0]);
      return s;
    }
    default:
      return {};
  }
}

// One simulated job: the tensor list and what every rank holds of each.
struct Job {
  int world = 1, tp = 1, ep = 1;
  bool zero = false;
  std::vector<TensorInfo> tensors;
  std::vector<std::vector<Holding>> holdings;  // [rank][tensor]
  std::vector<std::vector<LocalPiece>> held;   // [rank] pieces
};

// ZeRO-1 as optim/optimizer.h documents it: per group (DP for dense, EDP for
// experts), the local tensors flattened in list order form one index space of
// N elements; group rank g of s owns [N g / s, N (g + 1) / s).
Job MakeJob(int world, int tp, int ep, bool zero) {
  Job job;
  job.world = world;
  job.tp = tp;
  job.ep = ep;
  job.zero = zero;
  const std::vector<SimTensor> params = Params();
  for (const SimTensor& p : params) job.tensors.push_back(p.info);
  for (const SimTensor& p : params)
    job.tensors.push_back({"optimizer/exp_avg/" + p.info.name, p.info.global_shape});
  job.holdings.resize(world);
  job.held.resize(world);
  for (int r = 0; r < world; ++r) {
    absl::StatusOr<parallel::RankLayout> layout = parallel::ComputeLayout(world, tp, ep, r);
    REQUIRE(layout.ok());
    std::vector<Holding>& h = job.holdings[r];
    for (const SimTensor& p : params) h.push_back({SpecOf(p, *layout), 0, -1});
    // Optimizer states.
    int64_t total[2] = {0, 0};
    std::vector<int64_t> local(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      local[i] = parallel::LocalShape(params[i].info.global_shape, h[i].shard).numel();
      total[params[i].expert] += local[i];
    }
    int64_t at[2] = {0, 0};
    for (size_t i = 0; i < params.size(); ++i) {
      Holding s = h[i];
      if (zero) {
        const int e = params[i].expert;
        const int64_t size = e ? layout->edp : layout->dp, g = e ? layout->edp_rank : layout->dp_rank;
        const int64_t own_begin = total[e] * g / size, own_end = total[e] * (g + 1) / size;
        const int64_t begin = std::max(own_begin, at[e]), end = std::min(own_end, at[e] + local[i]);
        s.flat_begin = end > begin ? begin - at[e] : 0;
        s.flat_end = end > begin ? end - at[e] : 0;
        at[e] += local[i];
      }
      h.push_back(s);
    }
    for (size_t t = 0; t < job.tensors.size(); ++t) {
      absl::StatusOr<std::vector<LocalPiece>> pieces =
          HeldPieces(static_cast<int>(t), job.tensors[t], h[t].shard, h[t].flat_begin, h[t].flat_end);
      REQUIRE(pieces.ok());
      job.held[r].insert(job.held[r].end(), pieces->begin(), pieces->end());
    }
  }
  return job;
}

// The value of element i of tensor t: distinct everywhere.
float Value(int t, int64_t i) { return static_cast<float>(t * 1000 + i); }

std::vector<float> Global(const TensorInfo& info, int t) {
  std::vector<float> v(info.global_shape.numel());
  for (size_t i = 0; i < v.size(); ++i) v[i] = Value(t, static_cast<int64_t>(i));
  return v;
}

Box WholeBox(const Shape& s) {
  Box b;
  b.offset.assign(s.rank(), 0);
  b.count.assign(s.begin(), s.end());
  return b;
}

// Checks a save plan: every element of every tensor in exactly one shard,
// every shard written by one of its holders, holders exactly those ranks.
void CheckSavePlan(const Job& job, const SavePlan& plan) {
  std::map<int, std::vector<int>> coverage;
  for (size_t t = 0; t < job.tensors.size(); ++t) coverage[t].assign(job.tensors[t].global_shape.numel(), 0);
  for (const PlannedShard& s : plan.shards) {
    REQUIRE(std::find(s.holders.begin(), s.holders.end(), s.owner) != s.holders.end());
    std::vector<int> expect;
    for (int r = 0; r < job.world; ++r) {
      for (const LocalPiece& p : job.held[r]) {
        if (p.tensor == s.tensor && p.box == s.box) {
          expect.push_back(r);
          break;
        }
      }
    }
    REQUIRE(s.holders == expect);
    // Mark the box's elements.
    const Box whole = WholeBox(job.tensors[s.tensor].global_shape);
    std::vector<float> ones(s.box.numel(), 1.0f), marks(whole.numel(), 0.0f);
    CopyRegion(ones.data(), s.box, marks.data(), whole, s.box, sizeof(float));
    for (size_t i = 0; i < marks.size(); ++i) coverage[s.tensor][i] += marks[i] != 0.0f;
  }
  for (const auto& [t, c] : coverage) {
    INFO(job.tensors[t].name);
    for (int n : c) REQUIRE(n == 1);
  }
  // Dataset names unique within each writer's file.
  for (int w : plan.writers) {
    std::vector<RankDataset> ds = RankFileDatasets(plan, job.tensors, w);
    REQUIRE_FALSE(ds.empty());
    std::set<std::string> names;
    for (const RankDataset& d : ds) REQUIRE(names.insert(d.dataset).second);
  }
}

// Executes a load of `saved` (a manifest and its shards' bytes) into `job`:
// reads, then the transfers, paired in order. Checks every rank's data and
// that every distinct box was read from disk by exactly one rank.
void LoadAndCheck(const Job& job, const ckpt::Manifest& manifest,
                  const std::map<std::pair<int, int>, std::vector<float>>& disk) {
  absl::StatusOr<std::vector<const ckpt::TensorEntry*>> entries = MatchManifest(manifest, job.tensors, "sim");
  REQUIRE(entries.ok());
  std::map<int, int> entry_index;  // tensor -> manifest entry
  for (size_t t = 0; t < job.tensors.size(); ++t) {
    for (int e = 0; e < manifest.tensors_size(); ++e) {
      if (&manifest.tensors(e) == (*entries)[t]) entry_index[t] = e;
    }
  }
  // Per rank, per tensor: the held elements.
  std::vector<std::map<int, std::vector<float>>> data(job.world);
  std::vector<LoadPlan> plans;
  std::map<std::pair<int, std::vector<int64_t>>, int> readers;  // (tensor, box offsets+counts) -> times read
  for (int r = 0; r < job.world; ++r) {
    for (const LocalPiece& p : job.held[r]) {
      std::vector<float>& v = data[r][p.tensor];
      v.resize(std::max<size_t>(v.size(), p.elem_offset + p.box.numel()), -1.0f);
    }
    plans.push_back(PlanLoad(job.held, *entries, r));
    for (const LoadPlan::PieceRead& pr : plans[r].reads) {
      const LocalPiece& p = job.held[r][pr.piece];
      std::vector<int64_t> key = p.box.offset;
      key.insert(key.end(), p.box.count.begin(), p.box.count.end());
      ++readers[{p.tensor, key}];
      float* dst = data[r][p.tensor].data() + p.elem_offset;
      const ckpt::TensorEntry& e = *(*entries)[p.tensor];
      int64_t covered = 0;
      for (const LoadPlan::Read& rd : pr.reads) {
        const ckpt::Shard& sh = e.shards(rd.shard);
        const Box sbox{{sh.offset().begin(), sh.offset().end()}, {sh.count().begin(), sh.count().end()}};
        REQUIRE(rd.whole == (sbox == p.box));
        const std::vector<float>& bytes = disk.at({entry_index[p.tensor], rd.shard});
        CopyRegion(bytes.data(), sbox, dst, p.box, rd.region, sizeof(float));
        covered += rd.region.numel();
      }
      REQUIRE(covered == p.box.numel());
    }
  }
  // Every distinct box read once.
  std::set<std::pair<int, std::vector<int64_t>>> distinct;
  for (int r = 0; r < job.world; ++r) {
    for (const LocalPiece& p : job.held[r]) {
      std::vector<int64_t> key = p.box.offset;
      key.insert(key.end(), p.box.count.begin(), p.box.count.end());
      distinct.insert({p.tensor, key});
    }
  }
  REQUIRE(readers.size() == distinct.size());
  for (const auto& [key, n] : readers) REQUIRE(n == 1);
  // Transfers: between each (sender, receiver) the sender's sends and the
  // receiver's receives pair up in order, same tensor and box.
  std::map<std::pair<int, int>, std::vector<int>> sends, recvs;  // (from, to) -> pieces
  for (int r = 0; r < job.world; ++r) {
    for (const LoadPlan::Transfer& t : plans[r].transfers) {
      if (t.send) {
        sends[{r, t.peer}].push_back(t.piece);
      } else {
        recvs[{t.peer, r}].push_back(t.piece);
      }
    }
  }
  REQUIRE(sends.size() == recvs.size());
  for (const auto& [pair, pieces] : sends) {
    const auto& [from, to] = pair;
    REQUIRE(recvs.count(pair) == 1);
    const std::vector<int>& in = recvs[pair];
    REQUIRE(in.size() == pieces.size());
    for (size_t k = 0; k < pieces.size(); ++k) {
      const LocalPiece& src = job.held[from][pieces[k]];
      const LocalPiece& dst = job.held[to][in[k]];
      REQUIRE(src.tensor == dst.tensor);
      REQUIRE(src.box == dst.box);
      std::memcpy(data[to][dst.tensor].data() + dst.elem_offset,
                  data[from][src.tensor].data() + src.elem_offset, src.box.numel() * sizeof(float));
    }
  }
  // Every rank holds exactly its part of the global values.
  for (int r = 0; r < job.world; ++r) {
    for (const LocalPiece& p : job.held[r]) {
      const std::vector<float> global = Global(job.tensors[p.tensor], p.tensor);
      std::vector<float> expect(p.box.numel());
      const Box whole = WholeBox(job.tensors[p.tensor].global_shape);
      CopyRegion(global.data(), whole, expect.data(), p.box, p.box, sizeof(float));
      const float* got = data[r][p.tensor].data() + p.elem_offset;
      INFO("rank " << r << " " << job.tensors[p.tensor].name << " " << p.box.ToString());
      for (int64_t i = 0; i < p.box.numel(); ++i) REQUIRE(got[i] == expect[i]);
    }
  }
}

// Saves `job` in memory: the manifest and each shard's values.
ckpt::Manifest SaveInMemory(const Job& job, std::map<std::pair<int, int>, std::vector<float>>* disk) {
  absl::StatusOr<SavePlan> plan = PlanSave(job.tensors, job.held);
  REQUIRE(plan.ok());
  CheckSavePlan(job, *plan);
  absl::StatusOr<parallel::RankLayout> layout = parallel::ComputeLayout(job.world, job.tp, job.ep, 0);
  REQUIRE(layout.ok());
  TrainState state;
  state.step = 7;
  ckpt::Manifest m = ManifestForSave(*plan, job.tensors, state, "model {}", *layout);
  std::map<int, uint64_t> sums;
  for (size_t i = 0; i < plan->shards.size(); ++i) sums[static_cast<int>(i)] = 100 + i;
  SetManifestChecksums(*plan, sums, &m);
  REQUIRE(ValidateManifest(m, "sim").ok());
  for (size_t t = 0; t < job.tensors.size(); ++t) {
    const std::vector<float> global = Global(job.tensors[t], static_cast<int>(t));
    const Box whole = WholeBox(job.tensors[t].global_shape);
    for (size_t k = 0; k < plan->tensor_shards[t].size(); ++k) {
      const PlannedShard& s = plan->shards[plan->tensor_shards[t][k]];
      const ckpt::Shard& sh = m.tensors(static_cast<int>(t)).shards(static_cast<int>(k));
      REQUIRE(sh.writer_rank() == s.owner);
      REQUIRE(sh.file() == RankFileName(s.owner));
      REQUIRE(sh.dataset() == s.dataset);
      REQUIRE(sh.checksum() == 100 + static_cast<uint64_t>(plan->tensor_shards[t][k]));
      std::vector<float>& bytes = (*disk)[{static_cast<int>(t), static_cast<int>(k)}];
      bytes.resize(s.box.numel());
      CopyRegion(global.data(), whole, bytes.data(), s.box, s.box, sizeof(float));
    }
  }
  return m;
}

TEST_CASE("Save plan, world 8 = TP 2 x DP 4, EP 2: replicas written once, by a holder") {
  for (bool zero : {false, true}) {
    Job job = MakeJob(8, 2, 2, zero);
    absl::StatusOr<SavePlan> plan = PlanSave(job.tensors, job.held);
    REQUIRE(plan.ok());
    CheckSavePlan(job, *plan);
    // q_proj (column-parallel): two shards of 4 rows, each held by the 4 ranks of one tp_rank.
    const std::vector<int>& q = plan->tensor_shards[1];
    REQUIRE(q.size() == 2);
    REQUIRE(plan->shards[q[0]].box.ToString() == "[0:4, 0:4]");
    REQUIRE(plan->shards[q[0]].holders == std::vector<int>{0, 2, 4, 6});
    REQUIRE(plan->shards[q[1]].holders == std::vector<int>{1, 3, 5, 7});
    // Experts: EP rank 0 (ranks 0, 1, 4, 5: TP replicas and EDP replicas) holds experts 0-1.
    const std::vector<int>& x = plan->tensor_shards[4];
    REQUIRE(x.size() == 2);
    REQUIRE(plan->shards[x[0]].box.ToString() == "[0:2, 0:3, 0:2]");
    REQUIRE(plan->shards[x[0]].holders == std::vector<int>{0, 1, 4, 5});
    // The embedding is one shard held everywhere.
    REQUIRE(plan->tensor_shards[0].size() == 1);
    REQUIRE(plan->shards[plan->tensor_shards[0][0]].holders.size() == 8);
    if (zero) {
      // ZeRO-1: the optimizer state of the embedding is split over the 4 DP ranks
      // of each TP rank, so no element of it is held twice within a DP group.
      const std::vector<int>& st = plan->tensor_shards[6];
      REQUIRE(st.size() > 1);
      for (int i : st) REQUIRE(plan->shards[i].holders.size() <= 2);  // the same flat range on both TP ranks
    }
  }
}

TEST_CASE("Save plan spreads the writes: four replicated tensors on four ranks, one each") {
  Job job;
  job.world = 4;
  job.tensors = {{"a", Shape{10}}, {"b", Shape{40}}, {"c", Shape{30}}, {"d", Shape{20}}};
  job.held.resize(4);
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t < 4; ++t) {
      auto p = HeldPieces(t, job.tensors[t], {}, 0, -1);
      REQUIRE(p.ok());
      job.held[r].push_back(p->front());
    }
  }
  absl::StatusOr<SavePlan> plan = PlanSave(job.tensors, job.held);
  REQUIRE(plan.ok());
  // Largest first, each to the least-loaded holder (lowest rank on ties).
  REQUIRE(plan->shards[1].owner == 0);  // b, 40
  REQUIRE(plan->shards[2].owner == 1);  // c, 30
  REQUIRE(plan->shards[3].owner == 2);  // d, 20
  REQUIRE(plan->shards[0].owner == 3);  // a, 10
  REQUIRE(plan->writers == std::vector<int>{0, 1, 2, 3});
  absl::StatusOr<parallel::RankLayout> layout = parallel::ComputeLayout(4, 1, 1, 0);
  REQUIRE(layout.ok());
  const ckpt::Manifest m = ManifestForSave(*plan, job.tensors, TrainState{}, "", *layout);
  REQUIRE(m.files_size() == 5);
  REQUIRE(m.files(0) == "model.h5");
  REQUIRE(m.files(1) == RankFileName(0));
  REQUIRE(m.total_bytes() == 100 * 4);
  REQUIRE(m.layout().world() == 4);
  REQUIRE(m.checksum_algorithm() == "xxh64");
}

TEST_CASE("Save plan names several shards of one tensor in one file name@k") {
  // One rank, a ZeRO-1 flat range that needs three boxes of a [3, 4] tensor,
  // plus the complement on the other rank.
  Job job;
  job.world = 2;
  job.tensors = {{"w", Shape{3, 4}}};
  job.held.resize(2);
  auto a = HeldPieces(0, job.tensors[0], {}, 2, 9);  // [0, 2:4], [1, 0:4], [2, 0:1]
  auto b0 = HeldPieces(0, job.tensors[0], {}, 0, 2);
  auto b1 = HeldPieces(0, job.tensors[0], {}, 9, 12);
  REQUIRE(a.ok());
  REQUIRE(b0.ok());
  REQUIRE(b1.ok());
  REQUIRE(a->size() == 3);
  REQUIRE((*a)[1].elem_offset == 2);
  job.held[0] = *a;
  job.held[1] = *b0;
  job.held[1].insert(job.held[1].end(), b1->begin(), b1->end());
  absl::StatusOr<SavePlan> plan = PlanSave(job.tensors, job.held);
  REQUIRE(plan.ok());
  std::vector<RankDataset> ds = RankFileDatasets(*plan, job.tensors, 0);
  REQUIRE(ds.size() == 3);
  REQUIRE(ds[0].dataset == "w@0");
  REQUIRE(ds[2].dataset == "w@2");
  REQUIRE(ds[0].global_shape == std::vector<int64_t>{3, 4});
  absl::StatusOr<std::vector<int>> pieces = WriterPieces(*plan, job.held[0], 0);
  REQUIRE(pieces.ok());
  REQUIRE(pieces->size() == 3);
  // Rank 1 cannot write rank 0's shards.
  REQUIRE_FALSE(WriterPieces(*plan, job.held[1], 0).ok());
}

TEST_CASE("Save plan rejects overlapping replicas and incomplete coverage, naming the tensor") {
  const std::vector<TensorInfo> tensors = {{"model.norm.weight", Shape{8}}};
  auto whole = HeldPieces(0, tensors[0], {}, 0, -1);
  auto half = HeldPieces(0, tensors[0], {}, 0, 4);
  REQUIRE(whole.ok());
  REQUIRE(half.ok());
  absl::StatusOr<SavePlan> overlap = PlanSave(tensors, {*whole, *half});
  REQUIRE(overlap.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE_THAT(std::string(overlap.status().message()),
               Catch::Contains("model.norm.weight") && Catch::Contains("overlapping"));
  absl::StatusOr<SavePlan> missing = PlanSave(tensors, {*half, *half});
  REQUIRE_THAT(std::string(missing.status().message()), Catch::Contains("hold 4 of its 8 elements"));
  // Boxes and flat ranges outside the tensor.
  parallel::ShardSpec bad;
  bad.tp_dim = 0;
  bad.tp_begin = 4;
  bad.tp_end = 12;
  REQUIRE_THAT(std::string(HeldPieces(0, tensors[0], bad, 0, -1).status().message()),
               Catch::Contains("outside the global shape"));
  REQUIRE_THAT(std::string(HeldPieces(0, tensors[0], {}, 3, 9).status().message()),
               Catch::Contains("flat range [3, 9)"));
}

TEST_CASE("Pieces survive the integer encoding used for the all-gather") {
  Job job = MakeJob(4, 2, 1, true);
  for (int r = 0; r < 4; ++r) {
    absl::StatusOr<std::vector<LocalPiece>> back = DecodePieces(EncodePieces(job.held[r]), job.tensors);
    REQUIRE(back.ok());
    REQUIRE(back->size() == job.held[r].size());
    for (size_t i = 0; i < back->size(); ++i) {
      REQUIRE((*back)[i].tensor == job.held[r][i].tensor);
      REQUIRE((*back)[i].box == job.held[r][i].box);
    }
  }
  REQUIRE_FALSE(DecodePieces(std::vector<int64_t>{1, 2, 3}, job.tensors).ok());
}

TEST_CASE("Load plan: every layout change reads each box once and fills every rank exactly") {
  struct Case {
    int world, tp, ep;
    bool zero;
  };
  const std::vector<std::pair<Case, Case>> cases = {
      {{8, 2, 2, false}, {8, 2, 2, false}},  // same layout: whole shards straight in
      {{8, 2, 2, true}, {8, 2, 2, true}},    // same layout with ZeRO-1
      {{8, 2, 2, false}, {4, 1, 4, true}},   // TP 2 -> 1, EP 2 -> 4, ZeRO-1 on
      {{4, 1, 2, true}, {2, 2, 1, false}},   // ZeRO-1 off, TP 1 -> 2
      {{1, 1, 1, false}, {8, 2, 2, true}},   // one rank -> eight
      {{8, 1, 4, true}, {1, 1, 1, false}},   // eight -> one
  };
  for (const auto& [from, to] : cases) {
    INFO("save world " << from.world << " tp " << from.tp << " ep " << from.ep << " zero " << from.zero
                       << " -> load world " << to.world << " tp " << to.tp << " ep " << to.ep << " zero "
                       << to.zero);
    std::map<std::pair<int, int>, std::vector<float>> disk;
    const ckpt::Manifest m = SaveInMemory(MakeJob(from.world, from.tp, from.ep, from.zero), &disk);
    const Job load = MakeJob(to.world, to.tp, to.ep, to.zero);
    LoadAndCheck(load, m, disk);
    if (from.world == to.world && from.tp == to.tp && from.ep == to.ep && from.zero == to.zero) {
      for (int r = 0; r < load.world; ++r) {
        for (const LoadPlan::PieceRead& pr :
             PlanLoad(load.held, *MatchManifest(m, load.tensors, "sim"), r).reads) {
          REQUIRE(pr.reads.size() == 1);
          REQUIRE(pr.reads[0].whole);
        }
      }
    }
  }
}

TEST_CASE("MatchManifest names a missing tensor and a shape change") {
  Job job = MakeJob(2, 1, 1, false);
  std::map<std::pair<int, int>, std::vector<float>> disk;
  const ckpt::Manifest m = SaveInMemory(job, &disk);
  std::vector<TensorInfo> other = job.tensors;
  other[0].global_shape = Shape{7, 4};
  absl::StatusOr<std::vector<const ckpt::TensorEntry*>> shape = MatchManifest(m, other, "ckpt/step_7");
  REQUIRE(shape.status().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE_THAT(std::string(shape.status().message()),
               Catch::Contains("model.embed_tokens.weight") && Catch::Contains("[6,4]"));
  other = job.tensors;
  other.push_back({"lm_head.weight", Shape{6, 4}});
  REQUIRE(MatchManifest(m, other, "ckpt/step_7").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("TrainState round-trips through the manifest proto") {
  TrainState s;
  s.step = 12;
  s.consumed_samples = 96;
  s.sampler_state = {1, 2, 3};
  s.rng = {{"dropout", 5, 77}};
  s.lr_step = 12;
  s.int_values["optimizer.step"] = 12;
  s.double_values["loss_scale"] = 0.5;
  REQUIRE(TrainStateFromProto(TrainStateToProto(s)) == s);
}

}  // namespace
}  // namespace moe
