#include "runtime/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "comm/agree.h"
#include "optim/optimizer.h"
#include "runtime/checkpoint.pb.h"
#include "runtime/checkpoint_format.h"
#include "runtime/checkpoint_hash.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.pb.h"
#include "runtime/core/logging.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

constexpr size_t kWriteChunk = size_t{8} << 20;  // hash then write 8 MiB at a time (stays in cache)

absl::Status Await(absl::StatusOr<comm::Work> work) {
  if (!work.ok()) return work.status();
  return work->Wait();
}

absl::StatusOr<std::vector<int64_t>> AllGatherInts(comm::Communicator& comm,
                                                   const std::vector<int64_t>& mine) {
  const int size = comm.size();
  int64_t n = static_cast<int64_t>(mine.size());
  std::vector<int64_t> counts(size);
  RETURN_IF_ERROR(Await(comm.AllGather(&n, counts.data(), 1, DType::kI64)));
  std::vector<size_t> recv_counts(size), displs(size);
  size_t total = 0;
  for (int r = 0; r < size; ++r) {
    recv_counts[r] = static_cast<size_t>(counts[r]);
    displs[r] = total;
    total += recv_counts[r];
  }
  std::vector<int64_t> all(std::max<size_t>(total, 1));
  std::vector<int64_t> send(mine);
  send.resize(std::max<size_t>(send.size(), 1));
  RETURN_IF_ERROR(
      Await(comm.AllGatherV(send.data(), mine.size(), all.data(), recv_counts, displs, DType::kI64)));
  all.resize(total);
  // Prefix each rank's part with its count so callers can split it.
  std::vector<int64_t> out;
  out.reserve(total + size);
  size_t at = 0;
  for (int r = 0; r < size; ++r) {
    out.push_back(counts[r]);
    out.insert(out.end(), all.begin() + at, all.begin() + at + recv_counts[r]);
    at += recv_counts[r];
  }
  return out;
}

// Every rank's pieces, for the plan: held[r] = rank r's (boxes only), and
// held[me] = `mine` itself (with its element offsets). Fails on every rank
// when the ranks passed different tensor lists.
absl::StatusOr<std::vector<std::vector<LocalPiece>>> GatherHeld(comm::Communicator& comm,
                                                                absl::Span<const TensorInfo> tensors,
                                                                const std::vector<LocalPiece>& mine) {
  const int size = comm.size();
  int64_t hash = static_cast<int64_t>(TensorListHash(tensors));
  std::vector<int64_t> hashes(size);
  RETURN_IF_ERROR(Await(comm.AllGather(&hash, hashes.data(), 1, DType::kI64)));
  for (int r = 1; r < size; ++r) {
    if (hashes[r] != hashes[0]) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint: rank ", r,
                       " passed a different list of tensors (names, global shapes or "
                       "order) than rank 0; every rank must pass the same list"));
    }
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> all, AllGatherInts(comm, EncodePieces(mine)));
  std::vector<std::vector<LocalPiece>> held(size);
  size_t at = 0;
  for (int r = 0; r < size; ++r) {
    const size_t n = static_cast<size_t>(all[at++]);
    ASSIGN_OR_RETURN(held[r], DecodePieces(absl::MakeConstSpan(all).subspan(at, n), tensors));
    at += n;
  }
  held[comm.rank()] = mine;
  return held;
}

std::string RandomSuffix() {
  std::random_device rd;
  const uint64_t x = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                     static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                     static_cast<uint64_t>(::getpid());
  return absl::StrFormat("%08x", static_cast<uint32_t>(x ^ (x >> 32)));
}

bool IsHostVisible(const Tensor& t) { return t.buffer() != nullptr && t.buffer()->host_visible(); }

// A host copy of a device tensor (synchronously).
absl::StatusOr<Tensor> CopyToHost(const Tensor& t) {
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Tensor host, Tensor::Empty(*cpu, t.shape(), t.dtype(), MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(t.device()));
  RETURN_IF_ERROR(ops::Copy(dev->default_stream(), t, host));
  RETURN_IF_ERROR(dev->default_stream().Synchronize());
  return host;
}

absl::Status CopyFromHost(const void* data, const Tensor& t) {
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Tensor host,
                   Tensor::FromHost(*cpu, t.shape(), t.dtype(), data, t.nbytes(), MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(t.device()));
  RETURN_IF_ERROR(ops::Copy(dev->default_stream(), host, t));
  return dev->default_stream().Synchronize();
}

}  // namespace

// ---- Public helpers ----------------------------------------------------------------

std::string OptimizerStateName(absl::string_view state_name, absl::string_view canonical_name) {
  return absl::StrCat("optimizer/", state_name, "/", canonical_name);
}

std::vector<ShardedTensor> ModelTensors(const parallel::ParameterList& params) {
  std::vector<ShardedTensor> out;
  for (const parallel::Parameter* p : params) {
    ShardedTensor t;
    t.name = p->name;
    t.global_shape = p->global_shape;
    t.shard = p->shard;
    t.tensor = p->value;
    out.push_back(std::move(t));
  }
  return out;
}

void AppendOptimizerTensors(const optim::Optimizer& optimizer, const parallel::ParameterList& params,
                            std::vector<ShardedTensor>& tensors) {
  std::map<const parallel::Parameter*, const optim::ParamState*> held;
  for (const optim::ParamState& s : optimizer.states()) held[s.param] = &s;
  for (const std::string& state : optimizer.state_names()) {
    for (const parallel::Parameter* p : params) {
      ShardedTensor t;
      t.name = OptimizerStateName(state, p->name);
      t.global_shape = p->global_shape;
      t.shard = p->shard;
      auto it = held.find(p);
      if (it == held.end()) {  // ZeRO-1: none of it here; listed so all ranks list the same
        t.flat_begin = t.flat_end = 0;
      } else {
        const optim::ParamState& s = *it->second;
        if (!s.whole()) {
          t.flat_begin = s.begin;
          t.flat_end = s.end;
        }
        if (const Tensor* value = s.Find(state)) t.tensor = *value;
      }
      tensors.push_back(std::move(t));
    }
  }
}

CheckpointOptions CheckpointOptionsFromConfig(const config::CheckpointConfig& config) {
  CheckpointOptions o;
  o.dir = config.dir();
  o.keep_last = config.keep_last();
  o.async = config.async();
  o.partial_load = config.partial_load();
  o.timeout_s = config.timeout_s();
  return o;
}

double CheckpointDeadline(double base_s, int64_t bytes) {
  return base_s + static_cast<double>(std::max<int64_t>(bytes, 0)) / kCheckpointAssumedBytesPerS;
}

// ---- Checkpointer ------------------------------------------------------------------

struct Checkpointer::SaveTask {
  int64_t step = 0;
  std::string root, tmp_dir, final_name, suffix;
  ckpt::Manifest manifest;  // rank 0: everything but the checksums until written
  SavePlan plan;
  struct Write {
    int shard = 0;
    uint64_t file_offset = 0;
    const char* data = nullptr;
    int64_t nbytes = 0;
    uint64_t checksum = 0;
  };
  std::vector<Write> writes;
  std::string rank_file;                 // empty when this rank writes nothing
  std::vector<std::vector<char>> owned;  // async: host copies of the shards
  std::vector<Tensor> staged;            // host copies of device tensors
  absl::Status status;
};

Checkpointer::Checkpointer(std::unique_ptr<comm::Communicator> comm, const parallel::RankLayout& layout,
                           CheckpointOptions options)
    : comm_(std::move(comm)),
      base_timeout_s_(comm_->timeout_s()),
      layout_(layout),
      options_(std::move(options)) {
  fs_ = options_.fs != nullptr ? options_.fs : CheckpointFs::Default();
}

absl::StatusOr<std::unique_ptr<Checkpointer>> Checkpointer::Create(comm::Communicator& world,
                                                                   const parallel::RankLayout& layout,
                                                                   CheckpointOptions options) {
  if (options.keep_last < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint.keep_last = ", options.keep_last, " must be >= 0 (0: keep all)"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<comm::Communicator> comm, world.Split(0, world.rank(), "checkpoint"));
  if (!(options.timeout_s >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint.timeout_s = ", options.timeout_s,
                                                   " must be > 0 (or unset: scaled from the bytes)"));
  }
  if (options.timeout_s > 0) RETURN_IF_ERROR(comm->set_timeout_s(options.timeout_s, "checkpoint.timeout_s"));
  return std::unique_ptr<Checkpointer>(new Checkpointer(std::move(comm), layout, std::move(options)));
}

absl::Status Checkpointer::SetDeadline(int64_t bytes) {
  if (options_.timeout_s > 0) return absl::OkStatus();
  return comm_->set_timeout_s(CheckpointDeadline(base_timeout_s_, bytes), "checkpoint.timeout_s");
}

Checkpointer::~Checkpointer() {
  absl::Status s = WaitForPendingSave();
  if (!s.ok()) MOE_LOG(ERROR) << "checkpoint: the last async save failed: " << s.message();
}

absl::Status Checkpointer::Agree(const absl::Status& local) {
  absl::Status agreed;
  RETURN_IF_ERROR(comm::AgreeOnStatus(*comm_, local, &agreed));
  return agreed;
}

absl::Status Checkpointer::WaitForPendingSave() {
  if (!worker_.joinable()) return absl::OkStatus();
  worker_.join();
  absl::Status s = pending_->status;
  pending_.reset();
  return s;
}

absl::Status Checkpointer::Save(const TrainState& state, absl::Span<const ShardedTensor> tensors,
                                const std::string& config_text) {
  RETURN_IF_ERROR(WaitForPendingSave());
  if (options_.dir.empty()) {
    return absl::FailedPreconditionError("checkpoint: no checkpoint.dir is set; set it to save checkpoints");
  }
  if (state.step < 0)
    return absl::InvalidArgumentError(absl::StrCat("checkpoint: step ", state.step, " < 0"));
  const bool root_rank = comm_->rank() == 0;
  absl::StatusOr<std::vector<LocalPiece>> local_pieces = LocalPieces(tensors);
  RETURN_IF_ERROR(Agree(local_pieces.status()));
  const std::vector<LocalPiece>& pieces = *local_pieces;
  const std::vector<TensorInfo> infos = TensorInfos(tensors);
  auto task = std::make_shared<SaveTask>();
  task->step = state.step;
  task->root = options_.dir;
  task->final_name = StepDirName(state.step);
  ASSIGN_OR_RETURN(std::vector<std::vector<LocalPiece>> held, GatherHeld(*comm_, infos, pieces));
  absl::StatusOr<SavePlan> plan = PlanSave(infos, held);
  RETURN_IF_ERROR(Agree(plan.status()));
  task->plan = std::move(*plan);
  int64_t save_bytes = 0;
  for (const PlannedShard& s : task->plan.shards) save_bytes += s.box.numel() * 4;
  RETURN_IF_ERROR(SetDeadline(save_bytes));

  // Rank 0: a fresh temporary directory (and away with crashed saves' ones).
  std::vector<char> name(256, 0);
  absl::Status local;
  if (root_rank) {
    local = fs_->CreateDir(task->root);
    if (local.ok()) {
      absl::StatusOr<std::vector<std::string>> entries = fs_->ListDir(task->root);
      if (entries.ok()) {
        for (const std::string& e : *entries) {
          if (absl::StrContains(e, ".tmp-")) {
            MOE_LOG(INFO) << "checkpoint: removing " << JoinPath(task->root, e)
                          << " (left by an unfinished save)";
            fs_->RemoveAll(JoinPath(task->root, e)).IgnoreError();
          }
        }
      }
      const std::string tmp = absl::StrCat(task->final_name, ".tmp-", RandomSuffix());
      std::memcpy(name.data(), tmp.data(), tmp.size());
      local = fs_->CreateDir(JoinPath(task->root, tmp));
    }
  }
  RETURN_IF_ERROR(Agree(local));
  RETURN_IF_ERROR(Await(comm_->Broadcast(name.data(), name.data(), name.size(), DType::kU8, 0)));
  const std::string tmp_name = name.data();
  task->tmp_dir = JoinPath(task->root, tmp_name);
  task->suffix = tmp_name.substr(tmp_name.find(".tmp-") + 5);

  // The files' HDF5 structure (calling thread): this rank's file, and on rank
  // 0 the master file. The manifest is complete but for the checksums.
  const int me = comm_->rank();
  std::vector<RankDataset> datasets = RankFileDatasets(task->plan, infos, me);
  for (int i : task->plan.ShardsWrittenBy(me)) {
    task->writes.push_back({i, 0, nullptr, task->plan.shards[i].box.numel() * 4, 0});
  }
  if (!datasets.empty()) {
    task->rank_file = JoinPath(task->tmp_dir, RankFileName(me));
    local = CreateRankFileLayout(task->rank_file, datasets);
    for (size_t k = 0; k < datasets.size(); ++k) task->writes[k].file_offset = datasets[k].file_offset;
  }
  if (local.ok() && root_rank) {
    task->manifest = ManifestForSave(task->plan, infos, state, config_text, layout_);
    local = WriteMasterFile(JoinPath(task->tmp_dir, kMasterFileName), task->manifest);
  }
  // Where each write's bytes are now (and, async, a private copy of them).
  absl::StatusOr<std::vector<int>> write_pieces = WriterPieces(task->plan, pieces, me);
  if (local.ok()) local = write_pieces.status();
  if (local.ok()) {
    std::map<int, Tensor> host;  // tensor index -> host-visible tensor
    for (size_t k = 0; k < task->writes.size(); ++k) {
      SaveTask::Write& w = task->writes[k];
      const LocalPiece& piece = pieces[(*write_pieces)[k]];
      const int t = piece.tensor;
      auto it = host.find(t);
      if (it == host.end()) {
        const Tensor& tensor = tensors[t].tensor;
        if (IsHostVisible(tensor)) {
          it = host.emplace(t, tensor).first;
        } else {
          absl::StatusOr<Tensor> copy = CopyToHost(tensor);
          if (!copy.ok()) {
            local = Annotate(copy.status(), absl::StrCat("checkpoint tensor ", tensors[t].name));
            break;
          }
          task->staged.push_back(*copy);
          it = host.emplace(t, *copy).first;
        }
      }
      const char* data = static_cast<const char*>(it->second.raw_data()) + piece.elem_offset * 4;
      if (options_.async && IsHostVisible(tensors[t].tensor)) {
        task->owned.emplace_back(data, data + w.nbytes);
        data = task->owned.back().data();
      }
      w.data = data;
    }
  }
  if (absl::Status agreed = Agree(local); !agreed.ok()) {
    if (root_rank) fs_->RemoveAll(task->tmp_dir).IgnoreError();
    return agreed;
  }
  if (!options_.async) return RunSaveTask(*task);
  pending_ = task;
  worker_ = std::thread([this, task] { task->status = RunSaveTask(*task); });
  return absl::OkStatus();
}

absl::Status Checkpointer::RunSaveTask(SaveTask& task) {
  const bool root_rank = comm_->rank() == 0;
  auto fail = [&](absl::Status s) {
    if (root_rank) {
      absl::Status r = fs_->RemoveAll(task.tmp_dir);
      if (!r.ok()) MOE_LOG(WARNING) << "checkpoint: could not remove " << task.tmp_dir << ": " << r.message();
    }
    return s;
  };
  // 1. This rank's shards: hash and write in chunks, then fsync.
  absl::Status local;
  if (!task.writes.empty()) {
    absl::StatusOr<std::unique_ptr<CheckpointFile>> file = fs_->OpenForWrite(task.rank_file);
    local = file.status();
    for (SaveTask::Write& w : task.writes) {
      if (!local.ok()) break;
      Xxh64 hash;
      for (int64_t done = 0; done < w.nbytes && local.ok();) {
        const size_t n = static_cast<size_t>(std::min<int64_t>(kWriteChunk, w.nbytes - done));
        hash.Update(w.data + done, n);
        local = (*file)->WriteAt(w.file_offset + static_cast<uint64_t>(done), w.data + done, n);
        done += static_cast<int64_t>(n);
      }
      w.checksum = hash.Digest();
    }
    if (local.ok()) local = (*file)->Sync();
    if (file.ok()) {
      absl::Status c = (*file)->Close();
      if (local.ok()) local = c;
    }
    if (!local.ok()) local = Annotate(local, absl::StrCat("checkpoint: writing ", task.rank_file));
  }
  if (absl::Status s = Agree(local); !s.ok()) return fail(s);
  // 2. Checksums to every rank (rank 0 needs them); rank 0 writes the manifest.
  std::vector<int64_t> mine;
  for (const SaveTask::Write& w : task.writes) {
    mine.push_back(w.shard);
    mine.push_back(static_cast<int64_t>(w.checksum));
  }
  absl::StatusOr<std::vector<int64_t>> all = AllGatherInts(*comm_, mine);
  if (!all.ok()) return all.status();
  if (root_rank) {
    std::map<int, uint64_t> sums;
    for (size_t at = 0; at < all->size();) {
      const int64_t n = (*all)[at++];
      for (int64_t k = 0; k < n; k += 2)
        sums[static_cast<int>((*all)[at + k])] = static_cast<uint64_t>((*all)[at + k + 1]);
      at += static_cast<size_t>(n);
    }
    SetManifestChecksums(task.plan, sums, &task.manifest);
    // model.h5 was written through HDF5 (closed, not synced): fsync it too.
    absl::StatusOr<std::unique_ptr<CheckpointFile>> master =
        fs_->OpenForWrite(JoinPath(task.tmp_dir, kMasterFileName));
    local = master.status();
    if (local.ok()) local = (*master)->Sync();
    if (master.ok()) {
      absl::Status c = (*master)->Close();
      if (local.ok()) local = c;
    }
    // The manifest carries model.h5's checksum, read back after the sync.
    if (local.ok()) {
      absl::StatusOr<std::string> master_bytes = fs_->ReadFile(JoinPath(task.tmp_dir, kMasterFileName));
      if (master_bytes.ok()) {
        task.manifest.set_master_checksum(Xxh64Hash(master_bytes->data(), master_bytes->size()));
      }
      local = master_bytes.status();
    }
    if (local.ok()) {
      local = fs_->WriteFile(JoinPath(task.tmp_dir, kManifestFileName), SerializeManifestFile(task.manifest));
    }
    if (local.ok()) local = fs_->SyncDir(task.tmp_dir);
  }
  if (absl::Status s = Agree(local); !s.ok()) return fail(s);
  // 3. Rank 0 publishes it.
  if (root_rank) local = Commit(task);
  return Agree(local);
}

absl::Status Checkpointer::Commit(SaveTask& task) {
  const std::string final_dir = JoinPath(task.root, task.final_name);
  std::string displaced;
  if (fs_->Exists(final_dir)) {  // the same step saved again: replace it
    displaced = absl::StrCat(final_dir, ".tmp-old-", task.suffix);
    RETURN_IF_ERROR(fs_->Rename(final_dir, displaced));
  }
  if (absl::Status s = fs_->Rename(task.tmp_dir, final_dir); !s.ok()) {
    fs_->RemoveAll(task.tmp_dir).IgnoreError();
    return s;
  }
  RETURN_IF_ERROR(fs_->SyncDir(task.root));
  const std::string latest_tmp = JoinPath(task.root, absl::StrCat(kLatestFileName, ".tmp-", task.suffix));
  RETURN_IF_ERROR(fs_->WriteFile(latest_tmp, task.final_name + "\n"));
  RETURN_IF_ERROR(fs_->Rename(latest_tmp, JoinPath(task.root, kLatestFileName)));
  RETURN_IF_ERROR(fs_->SyncDir(task.root));
  MOE_LOG(INFO) << "checkpoint: saved " << final_dir << " (" << task.manifest.total_bytes() << " bytes, "
                << task.manifest.files_size() - 1 << " rank files)";
  if (!displaced.empty()) {
    if (absl::Status s = fs_->RemoveAll(displaced); !s.ok()) {
      MOE_LOG(WARNING) << "checkpoint: could not remove the replaced " << displaced << ": " << s.message();
    }
  }
  if (options_.keep_last > 0) {
    absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> all = List(task.root);
    if (!all.ok()) {
      MOE_LOG(WARNING) << "checkpoint: keep_last: " << all.status().message();
      return absl::OkStatus();
    }
    int kept = 0;
    for (const auto& [step, path] : *all) {
      if (path == final_dir || kept < options_.keep_last - 1) {
        if (path != final_dir) ++kept;
        continue;
      }
      // Out of sight first (atomic), then removed.
      const std::string trash = absl::StrCat(path, ".tmp-del-", task.suffix);
      absl::Status s = fs_->Rename(path, trash);
      if (s.ok()) s = fs_->RemoveAll(trash);
      if (s.ok()) {
        MOE_LOG(INFO) << "checkpoint: removed " << path << " (checkpoint.keep_last = " << options_.keep_last
                      << ")";
      } else {
        MOE_LOG(WARNING) << "checkpoint: keep_last could not remove " << path << ": " << s.message();
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> Checkpointer::List(const std::string& dir) {
  return ListCheckpoints(dir);
}

absl::StatusOr<LoadedCheckpoint> Checkpointer::Load(const std::string& path,
                                                    absl::Span<const ShardedTensor> tensors) {
  RETURN_IF_ERROR(WaitForPendingSave());
  // 1. Manifest and the tensors' names and shapes (every rank reads it).
  const std::vector<TensorInfo> infos = TensorInfos(tensors);
  absl::StatusOr<std::vector<LocalPiece>> local_pieces = LocalPieces(tensors);
  absl::Status local = local_pieces.status();
  absl::StatusOr<ckpt::Manifest> manifest = absl::UnknownError("");
  absl::StatusOr<std::vector<const ckpt::TensorEntry*>> entries = absl::UnknownError("");
  std::vector<std::string> tensors_skipped;
  if (local.ok()) {
    manifest = ReadManifest(path);
    local = manifest.status();
  }
  if (local.ok()) local = ValidateManifest(*manifest, path);
  if (local.ok() && comm_->rank() == 0) local = CheckMasterFile(*manifest, path);
  if (local.ok()) {
    entries = MatchManifest(*manifest, infos, path, options_.partial_load, &tensors_skipped);
    local = entries.status();
  }
  RETURN_IF_ERROR(Agree(local));
  RETURN_IF_ERROR(SetDeadline(manifest->total_bytes()));
  const std::vector<LocalPiece>& pieces = *local_pieces;

  // 2. Who reads what (checkpoint_plan.h): a box held by several ranks
  //    (DP/EDP/TP replicas) is read from disk by one of them and sent to the
  //    others, so the checkpoint is read about once, whatever the replication.
  const int me = comm_->rank();
  ASSIGN_OR_RETURN(std::vector<std::vector<LocalPiece>> held, GatherHeld(*comm_, infos, pieces));
  const LoadPlan plan = PlanLoad(held, *entries, me);
  // Host memory of each tensor (device tensors: a staging copy).
  std::map<int, std::vector<char>> staging;
  auto host_base = [&](int i) -> char* {
    const Tensor& t = tensors[i].tensor;
    if (IsHostVisible(t)) return static_cast<char*>(t.raw_data());
    std::vector<char>& v = staging[i];
    v.resize(t.nbytes());
    return v.data();
  };
  // 3. Read the boxes assigned here from the shards overlapping them.
  const auto read_start = std::chrono::steady_clock::now();
  int64_t bytes_read = 0;
  {
    ShardReader reader(path);
    std::map<std::pair<int, int>, std::vector<char>> cache;  // (tensor, shard) -> bytes
    int cached_tensor = -1;
    for (const LoadPlan::PieceRead& pr : plan.reads) {
      if (!local.ok()) break;
      const LocalPiece& p = pieces[pr.piece];
      if (p.tensor != cached_tensor) cache.clear(), cached_tensor = p.tensor;
      char* dst = host_base(p.tensor) + p.elem_offset * 4;
      const ckpt::TensorEntry& e = *(*entries)[p.tensor];
      for (const LoadPlan::Read& r : pr.reads) {
        if (!local.ok()) break;
        const ckpt::Shard& sh = e.shards(r.shard);
        if (r.whole) {  // the saving layout held this box too: straight in
          local = reader.Read(e, sh, dst);
          bytes_read += sh.nbytes();
          continue;
        }
        auto it = cache.find({p.tensor, r.shard});
        if (it == cache.end()) {
          it = cache
                   .emplace(std::make_pair(p.tensor, r.shard),
                            std::vector<char>(static_cast<size_t>(sh.nbytes())))
                   .first;
          local = reader.Read(e, sh, it->second.data());
          bytes_read += sh.nbytes();
          if (!local.ok()) break;
        }
        const Box sbox{{sh.offset().begin(), sh.offset().end()}, {sh.count().begin(), sh.count().end()}};
        CopyRegion(it->second.data(), sbox, dst, p.box, r.region, 4);
      }
    }
  }
  const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - read_start).count();
  RETURN_IF_ERROR(Agree(local));
  // 4. Replicas: each reader sends its boxes to the other holders.
  const auto exchange_start = std::chrono::steady_clock::now();
  std::vector<comm::P2POp> ops;
  for (const LoadPlan::Transfer& t : plan.transfers) {
    const LocalPiece& p = pieces[t.piece];
    char* data = host_base(p.tensor) + p.elem_offset * 4;
    const size_t count = static_cast<size_t>(p.box.numel());
    ops.push_back(t.send ? comm::P2POp::Send(data, count, DType::kF32, t.peer)
                         : comm::P2POp::Recv(data, count, DType::kF32, t.peer));
  }
  if (!ops.empty()) RETURN_IF_ERROR(Await(comm_->GroupP2P(ops)));
  MOE_LOG(DEBUG) << "checkpoint: load read " << bytes_read << " bytes in " << read_s << " s, exchanged "
                 << ops.size() << " boxes with replicas in "
                 << std::chrono::duration<double>(std::chrono::steady_clock::now() - exchange_start).count()
                 << " s";
  for (auto& [i, bytes] : staging) {
    if (!local.ok()) break;
    local = CopyFromHost(bytes.data(), tensors[i].tensor);
  }
  RETURN_IF_ERROR(Agree(local));

  LoadedCheckpoint out;
  out.path = path;
  for (const std::string& line : tensors_skipped) {
    MOE_LOG_RANK0(WARNING) << "checkpoint: partial load (checkpoint.partial_load) skipped " << line;
  }
  out.tensors_skipped = std::move(tensors_skipped);
  out.state = TrainStateFromProto(manifest->train());
  out.config_text = manifest->config_text();
  const ckpt::Layout& l = manifest->layout();
  out.layout = {l.world(), l.tp(), l.dp(), l.ep(), l.edp()};
  MOE_LOG_RANK0(INFO) << "checkpoint: loaded " << path << " (step " << out.state.step << ", saved at world "
                      << l.world() << " tp " << l.tp() << " ep " << l.ep() << " dp " << l.dp() << ")";
  return out;
}

absl::StatusOr<std::optional<LoadedCheckpoint>> Checkpointer::Resume(
    const std::string& resume, absl::Span<const ShardedTensor> tensors) {
  if (resume == "none") return std::optional<LoadedCheckpoint>();
  std::string root;
  if (resume == "auto") {
    root = options_.dir;
    if (root.empty()) {
      MOE_LOG_RANK0(INFO) << "resume: auto, but no checkpoint.dir is set: starting from scratch";
      return std::optional<LoadedCheckpoint>();
    }
  } else if (resume.empty()) {
    return absl::InvalidArgumentError("train.resume is empty; use auto, none or a checkpoint directory");
  } else if (CheckpointFs::Default()->Exists(JoinPath(resume, kManifestFileName))) {
    ASSIGN_OR_RETURN(LoadedCheckpoint loaded, Load(resume, tensors));
    return std::optional<LoadedCheckpoint>(std::move(loaded));
  } else {
    root = resume;
  }
  // Rank 0's listing, so that every rank tries the same candidates in order.
  std::vector<int64_t> steps;
  absl::Status local;
  if (comm_->rank() == 0) {
    absl::StatusOr<std::vector<std::pair<int64_t, std::string>>> list = List(root);
    local = list.status();
    if (list.ok()) {
      for (const auto& [step, path] : *list) steps.push_back(step);
    }
  }
  RETURN_IF_ERROR(Agree(local));
  int64_t n = static_cast<int64_t>(steps.size());
  RETURN_IF_ERROR(Await(comm_->Broadcast(&n, &n, 1, DType::kI64, 0)));
  steps.resize(std::max<int64_t>(n, 1));
  RETURN_IF_ERROR(Await(comm_->Broadcast(steps.data(), steps.data(), steps.size(), DType::kI64, 0)));
  steps.resize(n);
  if (steps.empty()) {
    if (resume != "auto") {
      return absl::NotFoundError(absl::StrCat(
          "train.resume = ", resume, ": neither a checkpoint (no manifest.pb) nor a directory of them"));
    }
    MOE_LOG_RANK0(INFO) << "resume: no checkpoint under " << root << ": starting from scratch";
    return std::optional<LoadedCheckpoint>();
  }
  std::vector<std::string> skipped;
  for (int64_t step : steps) {
    const std::string path = JoinPath(root, StepDirName(step));
    absl::StatusOr<LoadedCheckpoint> loaded = Load(path, tensors);
    if (loaded.ok()) {
      loaded->skipped = skipped;
      if (!skipped.empty()) {
        MOE_LOG_RANK0(WARNING) << "resume: took " << path << " after skipping " << skipped.size()
                               << " newer checkpoint(s)";
      }
      return std::optional<LoadedCheckpoint>(std::move(*loaded));
    }
    const std::string why = absl::StrCat(StepDirName(step), ": ", loaded.status().message());
    MOE_LOG_RANK0(WARNING) << "resume: skipping " << why;
    skipped.push_back(why);
  }
  return absl::DataLossError(
      absl::StrCat("resume: no valid checkpoint under ", root, "; skipped ", absl::StrJoin(skipped, "; ")));
}

}  // namespace moe
