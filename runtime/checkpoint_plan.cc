#include "runtime/checkpoint_plan.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/checkpoint_hash.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

constexpr int kPieceInts = 1 + 2 * kMaxTensorDims;  // tensor index, offsets, counts

// A total order of (tensor, box): the key every rank sorts shards by.
std::vector<int64_t> PieceKey(int tensor, const Box& box) {
  std::vector<int64_t> key(kPieceInts, 0);
  key[0] = tensor;
  for (int d = 0; d < box.rank(); ++d) {
    key[1 + d] = box.offset[d];
    key[1 + kMaxTensorDims + d] = box.count[d];
  }
  return key;
}

std::vector<int64_t> GlobalDims(const Shape& s) { return std::vector<int64_t>(s.begin(), s.end()); }

}  // namespace

std::vector<TensorInfo> TensorInfos(absl::Span<const ShardedTensor> tensors) {
  std::vector<TensorInfo> out;
  out.reserve(tensors.size());
  for (const ShardedTensor& t : tensors) out.push_back({t.name, t.global_shape});
  return out;
}

uint64_t TensorListHash(absl::Span<const TensorInfo> tensors) {
  Xxh64 h;
  for (const TensorInfo& t : tensors) {
    h.Update(t.name.data(), t.name.size() + 1);
    const std::vector<int64_t> dims = GlobalDims(t.global_shape);
    const int64_t rank = static_cast<int64_t>(dims.size());
    h.Update(&rank, sizeof(rank));
    h.Update(dims.data(), dims.size() * sizeof(int64_t));
  }
  return h.Digest();
}

absl::StatusOr<std::vector<LocalPiece>> HeldPieces(int index, const TensorInfo& info,
                                                   const parallel::ShardSpec& shard, int64_t flat_begin,
                                                   int64_t flat_end) {
  const std::string what = absl::StrCat("checkpoint tensor ", info.name.empty() ? "(no name)" : info.name);
  if (info.global_shape.rank() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": global shape ", info.global_shape.ToString(),
                                                   " must have rank 1..", kMaxTensorDims));
  }
  Box box;
  box.offset = parallel::ShardOffsets(info.global_shape, shard);
  const Shape local = parallel::LocalShape(info.global_shape, shard);
  box.count.assign(local.begin(), local.end());
  for (int d = 0; d < box.rank(); ++d) {
    if (box.offset[d] < 0 || box.count[d] < 0 || box.offset[d] + box.count[d] > info.global_shape[d]) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": shard box ", box.ToString(),
                                                     " is outside the global shape ",
                                                     info.global_shape.ToString()));
    }
  }
  std::vector<LocalPiece> pieces;
  if (flat_end < 0) {
    if (box.numel() > 0) pieces.push_back({index, std::move(box), 0});
    return pieces;
  }
  if (flat_begin < 0 || flat_begin > flat_end || flat_end > box.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": flat range [", flat_begin, ", ", flat_end,
                                                   ") is not inside the box's ", box.numel(), " elements"));
  }
  int64_t offset = 0;
  for (Box& b : DecomposeFlatRange(box, flat_begin, flat_end)) {
    const int64_t n = b.numel();
    pieces.push_back({index, std::move(b), offset});
    offset += n;
  }
  return pieces;
}

absl::StatusOr<std::vector<LocalPiece>> LocalPieces(absl::Span<const ShardedTensor> tensors) {
  std::vector<LocalPiece> pieces;
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const ShardedTensor& t = tensors[i];
    if (t.name.empty() || !names.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint tensor ",
                                                     t.name.empty() ? "(no name)" : t.name,
                                                     ": names must be non-empty and unique"));
    }
    ASSIGN_OR_RETURN(std::vector<LocalPiece> mine, HeldPieces(static_cast<int>(i), {t.name, t.global_shape},
                                                              t.shard, t.flat_begin, t.flat_end));
    int64_t held = 0;
    for (const LocalPiece& p : mine) held += p.box.numel();
    if (held == 0) continue;
    if (!t.tensor.defined() || t.tensor.dtype() != DType::kF32 || t.tensor.numel() != held) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint tensor ", t.name, ": tensor ",
                                                     t.tensor.defined() ? t.tensor.ToString() : "undefined",
                                                     " must be f32 with ", held, " elements"));
    }
    pieces.insert(pieces.end(), mine.begin(), mine.end());
  }
  return pieces;
}

std::vector<int64_t> EncodePieces(absl::Span<const LocalPiece> pieces) {
  std::vector<int64_t> out;
  out.reserve(pieces.size() * kPieceInts);
  for (const LocalPiece& p : pieces) {
    const std::vector<int64_t> key = PieceKey(p.tensor, p.box);
    out.insert(out.end(), key.begin(), key.end());
  }
  return out;
}

absl::StatusOr<std::vector<LocalPiece>> DecodePieces(absl::Span<const int64_t> ints,
                                                     absl::Span<const TensorInfo> tensors) {
  if (ints.size() % kPieceInts != 0) {
    return absl::InternalError(
        absl::StrCat("checkpoint: ", ints.size(), " piece integers are not a multiple of ", kPieceInts));
  }
  std::vector<LocalPiece> out;
  for (size_t at = 0; at < ints.size(); at += kPieceInts) {
    const int64_t t = ints[at];
    if (t < 0 || t >= static_cast<int64_t>(tensors.size())) {
      return absl::InternalError(
          absl::StrCat("checkpoint: piece of tensor ", t, " outside the ", tensors.size(), " tensors"));
    }
    LocalPiece p;
    p.tensor = static_cast<int>(t);
    const int rank = tensors[t].global_shape.rank();
    p.box.offset.assign(ints.begin() + at + 1, ints.begin() + at + 1 + rank);
    p.box.count.assign(ints.begin() + at + 1 + kMaxTensorDims, ints.begin() + at + 1 + kMaxTensorDims + rank);
    out.push_back(std::move(p));
  }
  return out;
}

std::vector<PlannedShard> DistinctShards(const std::vector<std::vector<LocalPiece>>& held) {
  std::map<std::vector<int64_t>, PlannedShard> by_key;
  for (size_t r = 0; r < held.size(); ++r) {
    for (const LocalPiece& p : held[r]) {
      PlannedShard& s = by_key[PieceKey(p.tensor, p.box)];
      if (s.holders.empty()) {
        s.tensor = p.tensor;
        s.box = p.box;
      }
      if (s.holders.empty() || s.holders.back() != static_cast<int>(r))
        s.holders.push_back(static_cast<int>(r));
    }
  }
  std::vector<PlannedShard> shards;
  shards.reserve(by_key.size());
  for (auto& [key, s] : by_key) shards.push_back(std::move(s));
  // Owners: largest shards first, each to the holder with the fewest elements so far.
  std::vector<int> order(shards.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return shards[a].box.numel() > shards[b].box.numel(); });
  std::vector<int64_t> load(held.size(), 0);
  for (int i : order) {
    PlannedShard& s = shards[i];
    int best = s.holders.front();
    for (int r : s.holders) {
      if (load[r] < load[best]) best = r;
    }
    s.owner = best;
    load[best] += s.box.numel();
  }
  return shards;
}

// ---- Save ------------------------------------------------------------------------

std::vector<int> SavePlan::ShardsWrittenBy(int rank) const {
  std::vector<int> out;
  for (size_t i = 0; i < shards.size(); ++i) {
    if (shards[i].owner == rank) out.push_back(static_cast<int>(i));
  }
  return out;
}

absl::StatusOr<SavePlan> PlanSave(absl::Span<const TensorInfo> tensors,
                                  const std::vector<std::vector<LocalPiece>>& held) {
  SavePlan plan;
  plan.shards = DistinctShards(held);
  plan.tensor_shards.resize(tensors.size());
  for (size_t i = 0; i < plan.shards.size(); ++i) {
    const int t = plan.shards[i].tensor;
    if (t < 0 || t >= static_cast<int>(tensors.size())) {
      return absl::InternalError(absl::StrCat("checkpoint: a shard of tensor ", t, " outside the list"));
    }
    plan.tensor_shards[t].push_back(static_cast<int>(i));
  }
  // The distinct boxes must tile each global tensor exactly.
  for (size_t t = 0; t < tensors.size(); ++t) {
    int64_t covered = 0;
    const std::vector<int>& idx = plan.tensor_shards[t];
    for (size_t a = 0; a < idx.size(); ++a) {
      const Box& ba = plan.shards[idx[a]].box;
      covered += ba.numel();
      for (size_t b = a + 1; b < idx.size(); ++b) {
        if (Intersect(ba, plan.shards[idx[b]].box)) {
          return absl::InvalidArgumentError(
              absl::StrCat("checkpoint tensor ", tensors[t].name,
                           ": ranks hold overlapping but different boxes ", ba.ToString(), " and ",
                           plan.shards[idx[b]].box.ToString(), "; replicas must hold identical boxes"));
        }
      }
    }
    if (covered != tensors[t].global_shape.numel()) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint tensor ", tensors[t].name, ": the ranks hold ", covered, " of its ",
                       tensors[t].global_shape.numel(), " elements; together they must hold all of it"));
    }
  }
  // Dataset names in the rank files: the tensor's name, "@k" when one file
  // holds several shards of it.
  std::map<std::pair<int, int>, int> per_file;  // (writer, tensor) -> shards
  for (const PlannedShard& s : plan.shards) ++per_file[{s.owner, s.tensor}];
  std::map<std::pair<int, int>, int> seen;
  std::set<int> writers;
  for (PlannedShard& s : plan.shards) {
    const std::string& name = tensors[s.tensor].name;
    const int k = seen[{s.owner, s.tensor}]++;
    s.dataset = per_file[{s.owner, s.tensor}] == 1 ? name : absl::StrCat(name, "@", k);
    writers.insert(s.owner);
  }
  plan.writers.assign(writers.begin(), writers.end());
  return plan;
}

std::vector<RankDataset> RankFileDatasets(const SavePlan& plan, absl::Span<const TensorInfo> tensors,
                                          int rank) {
  std::vector<RankDataset> out;
  for (int i : plan.ShardsWrittenBy(rank)) {
    const PlannedShard& s = plan.shards[i];
    RankDataset d;
    d.dataset = s.dataset;
    d.shape = s.box.count;
    d.global_offset = s.box.offset;
    d.global_shape = GlobalDims(tensors[s.tensor].global_shape);
    out.push_back(std::move(d));
  }
  return out;
}

absl::StatusOr<std::vector<int>> WriterPieces(const SavePlan& plan, absl::Span<const LocalPiece> pieces,
                                              int rank) {
  std::vector<int> out;
  for (int i : plan.ShardsWrittenBy(rank)) {
    const PlannedShard& s = plan.shards[i];
    int found = -1;
    for (size_t k = 0; k < pieces.size() && found < 0; ++k) {
      if (pieces[k].tensor == s.tensor && pieces[k].box == s.box) found = static_cast<int>(k);
    }
    if (found < 0) {
      return absl::InternalError(absl::StrCat("checkpoint: rank ", rank, " writes shard ", s.box.ToString(),
                                              " of tensor ", s.tensor, " that it does not hold"));
    }
    out.push_back(found);
  }
  return out;
}

bool TrainState::operator==(const TrainState& o) const {
  auto rng_eq = [](const RngStreamState& a, const RngStreamState& b) {
    return a.name == b.name && a.seed == b.seed && a.counter == b.counter;
  };
  return step == o.step && consumed_samples == o.consumed_samples && sampler_state == o.sampler_state &&
         rng.size() == o.rng.size() && std::equal(rng.begin(), rng.end(), o.rng.begin(), rng_eq) &&
         lr_step == o.lr_step && int_values == o.int_values && double_values == o.double_values;
}

ckpt::TrainState TrainStateToProto(const TrainState& s) {
  ckpt::TrainState p;
  p.set_step(s.step);
  p.set_consumed_samples(s.consumed_samples);
  for (int64_t v : s.sampler_state) p.add_sampler_state(v);
  for (const RngStreamState& r : s.rng) {
    ckpt::RngState* q = p.add_rng();
    q->set_name(r.name);
    q->set_seed(r.seed);
    q->set_counter(r.counter);
  }
  p.set_lr_step(s.lr_step);
  for (const auto& [k, v] : s.int_values) (*p.mutable_int_values())[k] = v;
  for (const auto& [k, v] : s.double_values) (*p.mutable_double_values())[k] = v;
  return p;
}

TrainState TrainStateFromProto(const ckpt::TrainState& p) {
  TrainState s;
  s.step = p.step();
  s.consumed_samples = p.consumed_samples();
  s.sampler_state.assign(p.sampler_state().begin(), p.sampler_state().end());
  for (const ckpt::RngState& r : p.rng()) s.rng.push_back({r.name(), r.seed(), r.counter()});
  s.lr_step = p.lr_step();
  for (const auto& [k, v] : p.int_values()) s.int_values[k] = v;
  for (const auto& [k, v] : p.double_values()) s.double_values[k] = v;
  return s;
}

ckpt::Manifest ManifestForSave(const SavePlan& plan, absl::Span<const TensorInfo> tensors,
                               const TrainState& state, const std::string& config_text,
                               const parallel::RankLayout& layout) {
  ckpt::Manifest m;
  m.set_step(state.step);
  m.set_created_by(absl::StrCat("moe-runtime checkpoint v", kCheckpointFormatVersion));
  m.set_config_text(config_text);
  m.mutable_layout()->set_world(layout.world);
  m.mutable_layout()->set_tp(layout.tp);
  m.mutable_layout()->set_dp(layout.dp);
  m.mutable_layout()->set_ep(layout.ep);
  m.mutable_layout()->set_edp(layout.edp);
  *m.mutable_train() = TrainStateToProto(state);
  m.set_checksum_algorithm("xxh64");
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    ckpt::TensorEntry* e = m.add_tensors();
    e->set_name(tensors[t].name);
    e->set_dtype("f32");
    for (int64_t d : GlobalDims(tensors[t].global_shape)) e->add_global_shape(d);
    for (int i : plan.tensor_shards[t]) {
      const PlannedShard& s = plan.shards[i];
      ckpt::Shard* sh = e->add_shards();
      for (int64_t v : s.box.offset) sh->add_offset(v);
      for (int64_t v : s.box.count) sh->add_count(v);
      sh->set_writer_rank(s.owner);
      sh->set_file(RankFileName(s.owner));
      sh->set_dataset(s.dataset);
      sh->set_nbytes(s.box.numel() * 4);
      total += s.box.numel() * 4;
    }
  }
  m.add_files(kMasterFileName);
  for (int w : plan.writers) m.add_files(RankFileName(w));
  m.set_total_bytes(total);
  return m;
}

void SetManifestChecksums(const SavePlan& plan, const std::map<int, uint64_t>& checksums,
                          ckpt::Manifest* manifest) {
  for (size_t t = 0; t < plan.tensor_shards.size() && static_cast<int>(t) < manifest->tensors_size(); ++t) {
    ckpt::TensorEntry* e = manifest->mutable_tensors(static_cast<int>(t));
    for (size_t k = 0; k < plan.tensor_shards[t].size() && static_cast<int>(k) < e->shards_size(); ++k) {
      auto it = checksums.find(plan.tensor_shards[t][k]);
      e->mutable_shards(static_cast<int>(k))->set_checksum(it == checksums.end() ? 0 : it->second);
    }
  }
}

// ---- Load ------------------------------------------------------------------------

absl::StatusOr<std::vector<const ckpt::TensorEntry*>> MatchManifest(const ckpt::Manifest& manifest,
                                                                    absl::Span<const TensorInfo> tensors,
                                                                    const std::string& path, bool partial,
                                                                    std::vector<std::string>* skipped) {
  std::map<std::string, const ckpt::TensorEntry*> by_name;
  for (const ckpt::TensorEntry& e : manifest.tensors()) by_name[e.name()] = &e;
  std::vector<const ckpt::TensorEntry*> entries(tensors.size(), nullptr);
  std::vector<std::string> unused;
  if (skipped == nullptr) skipped = &unused;
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto it = by_name.find(tensors[i].name);
    if (it == by_name.end() && partial) {
      skipped->push_back(absl::StrCat(tensors[i].name, " ", tensors[i].global_shape.ToString(),
                                      ": not in the checkpoint, keeps its initial values"));
      continue;
    }
    if (it == by_name.end()) {
      return absl::NotFoundError(absl::StrCat(
          "checkpoint ", path, " has no tensor ", tensors[i].name,
          " (a different model or optimizer configuration?); resume with the config the checkpoint was saved "
          "with (moe-ckpt inspect --config), or set checkpoint.partial_load: true to start it from its "
          "initial values"));
    }
    const std::vector<int64_t> dims(it->second->global_shape().begin(), it->second->global_shape().end());
    if (dims != GlobalDims(tensors[i].global_shape)) {
      return absl::FailedPreconditionError(
          absl::StrCat("checkpoint ", path, ": tensor ", tensors[i].name, " has global shape ",
                       Shape(absl::MakeConstSpan(dims)).ToString(), ", the model's is ",
                       tensors[i].global_shape.ToString(), " (a different model configuration?)"));
    }
    entries[i] = it->second;
    by_name.erase(it);
  }
  if (!by_name.empty() && partial) {
    for (const auto& [name, e] : by_name) {
      const std::vector<int64_t> dims(e->global_shape().begin(), e->global_shape().end());
      skipped->push_back(absl::StrCat(name, " ", Shape(absl::MakeConstSpan(dims)).ToString(),
                                      ": not in this model, ignored"));
    }
  } else if (!by_name.empty()) {
    // Resuming into a smaller model (fewer layers, tied embeddings, another
    // optimizer) would drop these silently.
    std::vector<std::string> extra;
    for (const auto& [name, e] : by_name) extra.push_back(name);
    const size_t shown = std::min<size_t>(extra.size(), 8);
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " has ", extra.size(), " tensor(s) this model does not: ",
        absl::StrJoin(extra.begin(), extra.begin() + shown, ", "), extra.size() > shown ? ", ..." : "",
        " (a different model or optimizer configuration?); resume with the config the checkpoint was "
        "saved with (moe-ckpt inspect --config), or set checkpoint.partial_load: true to load the rest"));
  }
  return entries;
}

LoadPlan PlanLoad(const std::vector<std::vector<LocalPiece>>& held,
                  absl::Span<const ckpt::TensorEntry* const> entries, int rank) {
  LoadPlan plan;
  const std::vector<PlannedShard> shards = DistinctShards(held);
  std::map<std::vector<int64_t>, const PlannedShard*> by_key;
  for (const PlannedShard& s : shards) by_key[PieceKey(s.tensor, s.box)] = &s;
  const std::vector<LocalPiece>& mine = held[rank];
  // Reads: the pieces this rank owns, from the saved shards overlapping them.
  for (size_t k = 0; k < mine.size(); ++k) {
    const LocalPiece& p = mine[k];
    if (entries[p.tensor] == nullptr) continue;  // partial load: not in the checkpoint
    if (by_key.at(PieceKey(p.tensor, p.box))->owner != rank) continue;
    LoadPlan::PieceRead pr;
    pr.piece = static_cast<int>(k);
    const ckpt::TensorEntry& e = *entries[p.tensor];
    for (int s = 0; s < e.shards_size(); ++s) {
      const ckpt::Shard& sh = e.shards(s);
      const Box sbox{{sh.offset().begin(), sh.offset().end()}, {sh.count().begin(), sh.count().end()}};
      std::optional<Box> region = Intersect(p.box, sbox);
      if (!region) continue;
      pr.reads.push_back({s, *region, sbox == p.box});
    }
    plan.reads.push_back(std::move(pr));
  }
  // Replicas, in key order on every rank.
  std::map<std::vector<int64_t>, int> my_pieces;
  for (size_t k = 0; k < mine.size(); ++k) {
    if (entries[mine[k].tensor] != nullptr)
      my_pieces[PieceKey(mine[k].tensor, mine[k].box)] = static_cast<int>(k);
  }
  for (const auto& [key, k] : my_pieces) {
    const PlannedShard& s = *by_key.at(key);
    if (s.holders.size() < 2) continue;
    if (s.owner == rank) {
      for (int r : s.holders) {
        if (r != rank) plan.transfers.push_back({k, r, true});
      }
    } else {
      plan.transfers.push_back({k, s.owner, false});
    }
  }
  return plan;
}

}  // namespace moe
