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

// Copies the elements [begin, begin + n) of the f32 tensor `t` to (to_host)
// or from the first n elements of `host` (a CPU f32 tensor), synchronously:
// views of both and ops::Copy on the default stream of t's device, which
// orders it after the training work enqueued there.
absl::Status CopyRange(const Tensor& t, int64_t begin, int64_t n, const Tensor& host, bool to_host) {
  if (n == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(Backend * dev, GetBackend(t.device()));
  const Tensor range = t.Reshape(Shape{t.numel()}).Slice(begin, begin + n);
  const Tensor h = host.Slice(0, n);
  RETURN_IF_ERROR(ops::Copy(dev->default_stream(), to_host ? range : h, to_host ? h : range));
  return dev->default_stream().Synchronize();
}

// The row-major index inside `box` of the element at global coordinates `at`.
int64_t FlatIndex(const Box& box, absl::Span<const int64_t> at) {
  int64_t index = 0;
  for (int d = 0; d < box.rank(); ++d) index = index * box.count[d] + (at[d] - box.offset[d]);
  return index;
}

// Copies `region` of a saved shard (`shard`: host bytes laid out over `sbox`)
// into the piece `p` of the staged tensor `dev`, through `bucket`: the piece's
// elements go in bucket-sized flat ranges (each DecomposeFlatRange's runs,
// contiguous in the bucket); a range that the region covers only in part is
// first copied from the device, so that the elements around the region keep
// their values (they come from other shards).
absl::Status CopyRegionToDevice(const char* shard, const Box& sbox, const Tensor& dev, const LocalPiece& p,
                                const Box& region, const Tensor& bucket) {
  const int64_t chunk = bucket.numel(), numel = p.box.numel();
  std::vector<int64_t> last(region.offset);
  for (int d = 0; d < region.rank(); ++d) last[d] += region.count[d] - 1;
  const int64_t first_index = FlatIndex(p.box, region.offset), last_index = FlatIndex(p.box, last);
  char* base = static_cast<char*>(bucket.raw_data());
  for (int64_t begin = first_index / chunk * chunk; begin <= last_index; begin += chunk) {
    const int64_t end = std::min(begin + chunk, numel);
    std::vector<std::pair<Box, Box>> parts;  // (a run of the range, its overlap with the region)
    int64_t covered = 0;
    for (Box& run : DecomposeFlatRange(p.box, begin, end)) {
      if (std::optional<Box> overlap = Intersect(run, region)) {
        covered += overlap->numel();
        parts.emplace_back(std::move(run), std::move(*overlap));
      }
    }
    if (parts.empty()) continue;
    if (covered < end - begin)
      RETURN_IF_ERROR(CopyRange(dev, p.elem_offset + begin, end - begin, bucket, true));
    for (const auto& [run, overlap] : parts) {
      CopyRegion(shard, sbox, base + (FlatIndex(p.box, run.offset) - begin) * 4, run, overlap, 4);
    }
    RETURN_IF_ERROR(CopyRange(dev, p.elem_offset + begin, end - begin, bucket, false));
  }
  return absl::OkStatus();
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
  if (config.has_host_bucket_mb()) o.host_bucket_bytes = int64_t{config.host_bucket_mb()} << 20;
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
    const char* data = nullptr;  // the bytes in host memory, or null: see `device`
    int64_t nbytes = 0;
    uint64_t checksum = 0;
    // A sync save of a staged tensor: the bytes are its elements
    // [elem_offset, elem_offset + nbytes / 4), copied through the host bucket.
    Tensor device;
    int64_t elem_offset = 0;
  };
  std::vector<Write> writes;
  std::string rank_file;                 // empty when this rank writes nothing
  std::vector<std::vector<char>> owned;  // async: host copies of the shards of host tensors
  Tensor snapshot;                       // async: host copy of the shards of staged tensors
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
  // The bucket sizes the replicas' messages on load: every rank must agree.
  std::vector<int64_t> buckets(comm->size());
  RETURN_IF_ERROR(Await(comm->AllGather(&options.host_bucket_bytes, buckets.data(), 1, DType::kI64)));
  for (int r = 0; r < comm->size(); ++r) {
    if (buckets[r] < 4) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint host bucket = ", buckets[r], " bytes on rank ", r,
                       " must be at least 4 (one f32); set checkpoint.host_bucket_mb > 0"));
    }
    if (buckets[r] != buckets[0]) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint host bucket = ", buckets[r], " bytes on rank ", r, " but ", buckets[0],
                       " on rank 0: checkpoint.host_bucket_mb must be the same on every rank"));
    }
  }
  return std::unique_ptr<Checkpointer>(new Checkpointer(std::move(comm), layout, std::move(options)));
}

absl::Status Checkpointer::SetDeadline(int64_t bytes) {
  if (options_.timeout_s > 0) return absl::OkStatus();
  return comm_->set_timeout_s(CheckpointDeadline(base_timeout_s_, bytes), "checkpoint.timeout_s");
}

bool Checkpointer::Staged(const Tensor& t) const { return options_.stage_host_tensors || !IsHostVisible(t); }

absl::StatusOr<Tensor> Checkpointer::HostStaging(int64_t numel, Device device) {
  ASSIGN_OR_RETURN(Backend * backend, GetBackend(device));
  ASSIGN_OR_RETURN(std::shared_ptr<Buffer> buffer,
                   backend->AllocatePinnedHost(static_cast<size_t>(numel) * 4, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor host, Tensor::FromBuffer(std::move(buffer), 0, Shape{numel}, DType::kF32));
  staging_.Add(numel * 4);
  return host;
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
  staging_ = {};
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
    SaveTask::Write w;
    w.shard = i;
    w.nbytes = task->plan.shards[i].box.numel() * 4;
    task->writes.push_back(std::move(w));
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
  // Where each write's bytes are: host tensors' own memory (async: a private
  // copy); staged tensors' through the bucket at write time (sync), or a host
  // snapshot of just the pieces this rank writes (async, so that training can
  // change the tensors meanwhile).
  absl::StatusOr<std::vector<int>> write_pieces = WriterPieces(task->plan, pieces, me);
  if (local.ok()) local = write_pieces.status();
  if (local.ok()) {
    int64_t snapshot_numel = 0;
    for (size_t k = 0; k < task->writes.size(); ++k) {
      const LocalPiece& piece = pieces[(*write_pieces)[k]];
      if (Staged(tensors[piece.tensor].tensor)) snapshot_numel += task->writes[k].nbytes / 4;
    }
    if (options_.async && snapshot_numel > 0) {
      // Ordinary memory: page-locking the whole local model at every save
      // would cost more than its faster copies gain.
      absl::StatusOr<Tensor> snapshot = HostStaging(snapshot_numel, Device::Cpu());
      local = snapshot.status();
      if (local.ok()) task->snapshot = *snapshot;
    }
    int64_t snapshot_at = 0;
    for (size_t k = 0; k < task->writes.size() && local.ok(); ++k) {
      SaveTask::Write& w = task->writes[k];
      const LocalPiece& piece = pieces[(*write_pieces)[k]];
      const Tensor& tensor = tensors[piece.tensor].tensor;
      if (Staged(tensor)) {
        if (!options_.async) {
          w.device = tensor;
          w.elem_offset = piece.elem_offset;
          continue;
        }
        const int64_t n = w.nbytes / 4;
        local = CopyRange(tensor, piece.elem_offset, n, task->snapshot.Slice(snapshot_at, snapshot_at + n),
                          /*to_host=*/true);
        if (!local.ok())
          local = Annotate(local, absl::StrCat("checkpoint tensor ", tensors[piece.tensor].name));
        w.data = static_cast<const char*>(task->snapshot.raw_data()) + snapshot_at * 4;
        snapshot_at += n;
        continue;
      }
      const char* data = static_cast<const char*>(tensor.raw_data()) + piece.elem_offset * 4;
      if (options_.async) {
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
  // 1. This rank's shards: hash and write in chunks, then fsync. Staged
  //    tensors (sync saves only: an async task holds host copies) come
  //    through one host bucket, a bucket of elements at a time.
  absl::Status local;
  if (!task.writes.empty()) {
    absl::StatusOr<std::unique_ptr<CheckpointFile>> file = fs_->OpenForWrite(task.rank_file);
    local = file.status();
    int64_t largest_staged = 0;  // elements
    Device staged_device = Device::Cpu();
    for (const SaveTask::Write& w : task.writes) {
      if (!w.device.defined()) continue;
      largest_staged = std::max(largest_staged, w.nbytes / 4);
      staged_device = w.device.device();
    }
    Tensor bucket;
    if (local.ok() && largest_staged > 0) {
      absl::StatusOr<Tensor> b =
          HostStaging(std::min(largest_staged, options_.host_bucket_bytes / 4), staged_device);
      local = b.status();
      if (b.ok()) bucket = *b;
    }
    for (SaveTask::Write& w : task.writes) {
      if (!local.ok()) break;
      Xxh64 hash;
      auto put = [&](const char* data, int64_t at, int64_t nbytes) {
        for (int64_t done = 0; done < nbytes;) {
          const size_t n = static_cast<size_t>(std::min<int64_t>(kWriteChunk, nbytes - done));
          hash.Update(data + done, n);
          RETURN_IF_ERROR((*file)->WriteAt(w.file_offset + static_cast<uint64_t>(at + done), data + done, n));
          done += static_cast<int64_t>(n);
        }
        return absl::OkStatus();
      };
      if (!w.device.defined()) {
        local = put(w.data, 0, w.nbytes);
      } else {
        for (int64_t done = 0; done < w.nbytes && local.ok();) {
          const int64_t n = std::min(bucket.numel(), (w.nbytes - done) / 4);
          local = CopyRange(w.device, w.elem_offset + done / 4, n, bucket, /*to_host=*/true);
          if (local.ok()) local = put(static_cast<const char*>(bucket.raw_data()), done, n * 4);
          done += n * 4;
        }
      }
      w.checksum = hash.Digest();
    }
    if (bucket.defined()) {
      staging_.Sub(bucket.numel() * 4);
      bucket = Tensor();
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
  staging_ = {};
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
  // 3. Read the boxes assigned here from the shards overlapping them: host
  //    tensors straight into their memory; staged ones through the bucket,
  //    sized to the largest staged box read or exchanged here (at most
  //    host_bucket_bytes).
  int64_t largest_staged = 0;  // elements
  Device staged_device = Device::Cpu();
  auto note_staged = [&](const LocalPiece& p) {
    if (!Staged(tensors[p.tensor].tensor)) return;
    largest_staged = std::max(largest_staged, p.box.numel());
    staged_device = tensors[p.tensor].tensor.device();
  };
  for (const LoadPlan::PieceRead& pr : plan.reads) note_staged(pieces[pr.piece]);
  for (const LoadPlan::Transfer& t : plan.transfers) note_staged(pieces[t.piece]);
  Tensor bucket;
  if (largest_staged > 0) {
    absl::StatusOr<Tensor> b =
        HostStaging(std::min(largest_staged, options_.host_bucket_bytes / 4), staged_device);
    local = b.status();
    if (b.ok()) bucket = *b;
  }
  const auto read_start = std::chrono::steady_clock::now();
  int64_t bytes_read = 0;
  {
    ShardReader reader(path);
    // Saved shards a piece needs only part of (the layout changed), read whole
    // (their checksum covers the whole) and kept while the next reads may
    // need them: every shard of the current tensor for host tensors, as
    // before; for staged tensors just the last one, so that the host holds at
    // most one saved shard besides the bucket (a shard two non-consecutive
    // pieces share is then read twice).
    std::map<std::pair<int, int>, std::vector<char>> cache;  // (tensor, shard) -> bytes
    int64_t cached_staged_bytes = 0;
    auto clear_cache = [&] {
      cache.clear();
      staging_.Sub(cached_staged_bytes);
      cached_staged_bytes = 0;
    };
    int cached_tensor = -1;
    for (const LoadPlan::PieceRead& pr : plan.reads) {
      if (!local.ok()) break;
      const LocalPiece& p = pieces[pr.piece];
      if (p.tensor != cached_tensor) clear_cache(), cached_tensor = p.tensor;
      const Tensor& tensor = tensors[p.tensor].tensor;
      const bool staged = Staged(tensor);
      char* dst = staged ? nullptr : static_cast<char*>(tensor.raw_data()) + p.elem_offset * 4;
      const ckpt::TensorEntry& e = *(*entries)[p.tensor];
      for (const LoadPlan::Read& r : pr.reads) {
        if (!local.ok()) break;
        const ckpt::Shard& sh = e.shards(r.shard);
        if (r.whole) {  // the saving layout held this box too: straight in
          if (staged) {
            local = reader.ReadInChunks(
                e, sh, bucket.raw_data(), static_cast<size_t>(bucket.numel()) * 4, [&](int64_t at, size_t n) {
                  return CopyRange(tensor, p.elem_offset + at / 4, static_cast<int64_t>(n / 4), bucket,
                                   /*to_host=*/false);
                });
          } else {
            local = reader.Read(e, sh, dst);
          }
          bytes_read += sh.nbytes();
          continue;
        }
        auto it = cache.find({p.tensor, r.shard});
        if (it == cache.end()) {
          if (staged) clear_cache();
          it = cache
                   .emplace(std::make_pair(p.tensor, r.shard),
                            std::vector<char>(static_cast<size_t>(sh.nbytes())))
                   .first;
          if (staged) {
            cached_staged_bytes = sh.nbytes();
            staging_.Add(cached_staged_bytes);
          }
          local = reader.Read(e, sh, it->second.data());
          bytes_read += sh.nbytes();
          if (!local.ok()) break;
        }
        const Box sbox{{sh.offset().begin(), sh.offset().end()}, {sh.count().begin(), sh.count().end()}};
        if (staged) {
          local = CopyRegionToDevice(it->second.data(), sbox, tensor, p, r.region, bucket);
        } else {
          CopyRegion(it->second.data(), sbox, dst, p.box, r.region, 4);
        }
      }
      // (The reader's errors name the tensor already; a device copy's do not.)
      if (!local.ok() && staged)
        local = Annotate(local, absl::StrCat("checkpoint tensor ", tensors[p.tensor].name));
    }
    clear_cache();
  }
  const double read_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - read_start).count();
  RETURN_IF_ERROR(Agree(local));
  // 4. Replicas: each reader sends its boxes to the other holders.
  const auto exchange_start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(ExchangeReplicas(plan, pieces, tensors, bucket, &local));
  MOE_LOG(DEBUG) << "checkpoint: load read " << bytes_read << " bytes in " << read_s << " s, exchanged "
                 << plan.transfers.size() << " boxes with replicas in "
                 << std::chrono::duration<double>(std::chrono::steady_clock::now() - exchange_start).count()
                 << " s";
  if (bucket.defined()) {
    staging_.Sub(bucket.numel() * 4);
    bucket = Tensor();
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

// Every box goes in messages of at most host_bucket_bytes (the same on every
// rank, and both sides hold the same box, so sender and receiver cut it
// alike). A rank whose boxes here are all host tensors posts all its messages
// at once, as one GroupP2P. A rank with staged tensors goes through its
// transfers in plan order, one bucket of one box at a time (the reader sends
// it to all the other holders at once). That is deadlock-free: every rank
// lists its transfers in the same (tensor, box) order, so the first
// unfinished (box, bucket) step of the whole job has every rank taking part
// in it at that step (or with everything posted), and it completes. A failed
// device copy does not stop the exchange (the peers wait for its messages):
// it goes to *local after it, for the caller's Agree; the status returned is
// the communicator's.
absl::Status Checkpointer::ExchangeReplicas(const LoadPlan& plan, absl::Span<const LocalPiece> pieces,
                                            absl::Span<const ShardedTensor> tensors, const Tensor& bucket,
                                            absl::Status* local_status) {
  const int64_t chunk = options_.host_bucket_bytes / 4;
  auto host_data = [&](const LocalPiece& p) {
    return static_cast<char*>(tensors[p.tensor].tensor.raw_data()) + p.elem_offset * 4;
  };
  bool any_staged = false;
  for (const LoadPlan::Transfer& t : plan.transfers)
    any_staged |= Staged(tensors[pieces[t.piece].tensor].tensor);
  if (!any_staged) {
    std::vector<comm::P2POp> ops;
    for (const LoadPlan::Transfer& t : plan.transfers) {
      const LocalPiece& p = pieces[t.piece];
      char* data = host_data(p);
      for (int64_t begin = 0; begin < p.box.numel(); begin += chunk) {
        const size_t n = static_cast<size_t>(std::min(chunk, p.box.numel() - begin));
        ops.push_back(t.send ? comm::P2POp::Send(data + begin * 4, n, DType::kF32, t.peer)
                             : comm::P2POp::Recv(data + begin * 4, n, DType::kF32, t.peer));
      }
    }
    if (!ops.empty()) RETURN_IF_ERROR(Await(comm_->GroupP2P(ops)));
    return absl::OkStatus();
  }
  absl::Status& local = *local_status;
  int failed_at = -1;  // annotate the first failure once
  std::vector<comm::P2POp> ops;
  for (size_t i = 0; i < plan.transfers.size();) {
    // The transfers of one box: the reader's sends to every other holder, or
    // a holder's one receive.
    size_t j = i;
    while (j < plan.transfers.size() && plan.transfers[j].piece == plan.transfers[i].piece) ++j;
    const LocalPiece& p = pieces[plan.transfers[i].piece];
    const Tensor& tensor = tensors[p.tensor].tensor;
    const bool staged = Staged(tensor), send = plan.transfers[i].send;
    for (int64_t begin = 0; begin < p.box.numel(); begin += chunk) {
      const int64_t n = std::min(chunk, p.box.numel() - begin);
      char* data = staged ? static_cast<char*>(bucket.raw_data()) : host_data(p) + begin * 4;
      if (staged && send && local.ok()) local = CopyRange(tensor, p.elem_offset + begin, n, bucket, true);
      ops.clear();
      for (size_t k = i; k < j; ++k) {
        const int peer = plan.transfers[k].peer;
        ops.push_back(send ? comm::P2POp::Send(data, static_cast<size_t>(n), DType::kF32, peer)
                           : comm::P2POp::Recv(data, static_cast<size_t>(n), DType::kF32, peer));
      }
      RETURN_IF_ERROR(Await(comm_->GroupP2P(ops)));
      if (staged && !send && local.ok()) local = CopyRange(tensor, p.elem_offset + begin, n, bucket, false);
    }
    if (!local.ok() && failed_at < 0) {
      local = Annotate(local, absl::StrCat("checkpoint tensor ", tensors[p.tensor].name));
      failed_at = static_cast<int>(i);
    }
    i = j;
  }
  return absl::OkStatus();
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
