// moe-bench ckpt: sharded checkpoint save and load bandwidth against a plain
// sequential write/read of the same number of bytes to the same disk, in the
// same run.
//
//   mpirun -np 2 moe-bench ckpt [mb=384] [tp=1] [ep=WORLD] [reps=3] [dir=/tmp/moe_ckpt_bench]
//       [device=cpu|cuda|cuda:N] [bucket_mb=256] [stage=0|1]
//
// device=cuda: the tensors live in GPU memory (each rank on its local rank's
// GPU) and move through the checkpointer's host bucket of bucket_mb
// (checkpoint.host_bucket_mb); stage=1 runs that bucketed path on CPU
// tensors (CheckpointOptions::stage_host_tensors), so its cost shows on a
// machine without a GPU.
// The model: 8 dense [rows, 1024] tensors split over TP (replicated over DP:
// one replica writes each, balanced over the replicas) and 8 expert
// [E, rows / E, 1024] tensors split over EP (E = 8 * ep), about `mb` MB in
// all. Save: Checkpointer::Save (sync: data, fsync of every file, manifest,
// rename, `latest`). Load: Checkpointer::Load on the same layout, after the
// checkpoint's pages were dropped from the page cache (fadvise DONTNEED after
// fsync), so both read from disk. The baseline: rank 0 alone writes the same
// bytes to one file in 8 MiB write() calls and fsyncs, then drops the pages
// and reads them back. Best of `reps` for each. Ratio: checkpoint GB/s over
// baseline GB/s (target >= 0.5).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "comm/communicator.h"
#include "launch/bench/bench.h"
#include "parallel/layout.h"
#include "parallel/process_groups.h"
#include "runtime/checkpoint.h"
#include "runtime/core/backend.h"
#include "runtime/core/device_select.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

absl::Status Barrier(comm::Communicator& c) {
  ASSIGN_OR_RETURN(comm::Work w, c.Barrier());
  return w.Wait();
}

// Drops the clean pages of every file under `dir` from the page cache.
void DropCache(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Plain sequential write (+ fsync) and read of `bytes` in one file: seconds.
absl::Status PlainWriteRead(const std::string& path, int64_t bytes, double* write_s, double* read_s) {
  std::vector<char> buf(size_t{8} << 20);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<char>(i * 131);
  auto start = Clock::now();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  for (int64_t done = 0; done < bytes;) {
    const size_t n = static_cast<size_t>(std::min<int64_t>(buf.size(), bytes - done));
    const ssize_t w = ::write(fd, buf.data(), n);
    if (w <= 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("write ", path, ": ", std::strerror(errno)));
    }
    done += w;
  }
  ::fsync(fd);
  ::close(fd);
  *write_s = Seconds(start);
  DropCache(std::filesystem::path(path).parent_path().string());
  start = Clock::now();
  fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
  *read_s = Seconds(start);
  std::filesystem::remove(path);
  return absl::OkStatus();
}

absl::Status RunCkpt(const Args& args, Reporter& reporter) {
  const int64_t mb = args.Int("mb", 384);
  const int tp = static_cast<int>(args.Int("tp", 1));
  const int ep = static_cast<int>(args.Int("ep", args.world / tp));
  const int reps = static_cast<int>(args.Int("reps", 3));
  const std::string dir = args.Str("dir", "/tmp/moe_ckpt_bench");
  const int64_t bucket_mb = args.Int("bucket_mb", 256);
  const bool stage = args.Int("stage", 0) != 0;
  std::string placement;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(args.Str("device", "cpu"), &placement));
  if (bucket_mb < 1) return absl::InvalidArgumentError("ckpt: bucket_mb must be >= 1");
  if (stage && !device.is_cpu()) return absl::InvalidArgumentError("ckpt: stage=1 is for device=cpu");
  comm::CommOptions options;
  options.backend = "mpi";
  ASSIGN_OR_RETURN(auto world, comm::CreateWorldCommunicator(options));
  ASSIGN_OR_RETURN(parallel::ProcessGroups groups, parallel::CreateProcessGroups(std::move(world), tp, ep));
  const parallel::RankLayout& l = groups.layout;
  comm::Communicator& w = *groups.host.world;  // the control plane: checkpoint metadata, barriers

  // 16 tensors of `rows` x 1024 f32 each: 8 dense, 8 expert.
  const int64_t cols = 1024, experts = 8 * l.ep;
  const int64_t rows =
      std::max<int64_t>(experts * tp, (mb << 20) / 16 / (cols * 4) / (experts * tp) * experts * tp);
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Backend * be, GetBackend(device));
  std::vector<ShardedTensor> tensors;
  for (int i = 0; i < 16; ++i) {
    ShardedTensor t;
    const bool expert = i % 2 == 1;
    t.name = expert ? absl::StrCat("model.layers.", i / 2, ".mlp.experts.up_proj")
                    : absl::StrCat("model.layers.", i / 2, ".self_attn.q_proj.weight");
    if (expert) {
      t.global_shape = Shape{experts, rows / experts, cols};
      std::tie(t.shard.expert_begin, t.shard.expert_end) = parallel::OwnedExperts(experts, l.ep, l.ep_rank);
      t.shard.tp_dim = 1;
      t.shard.tp_begin = l.tp_rank * (rows / experts / tp);
      t.shard.tp_end = (l.tp_rank + 1) * (rows / experts / tp);
    } else {
      t.global_shape = Shape{rows, cols};
      t.shard.tp_dim = 0;
      t.shard.tp_begin = l.tp_rank * (rows / tp);
      t.shard.tp_end = (l.tp_rank + 1) * (rows / tp);
    }
    ASSIGN_OR_RETURN(t.tensor, Tensor::Empty(*cpu, parallel::LocalShape(t.global_shape, t.shard), DType::kF32,
                                             MemoryCategory::kParameters));
    float* p = t.tensor.data<float>();
    for (int64_t j = 0; j < t.tensor.numel(); ++j) p[j] = static_cast<float>((j * 7 + i) % 1000) * 0.5f;
    if (!device.is_cpu()) {
      ASSIGN_OR_RETURN(Tensor d,
                       Tensor::Empty(*be, t.tensor.shape(), DType::kF32, MemoryCategory::kParameters));
      RETURN_IF_ERROR(ops::Copy(be->default_stream(), t.tensor, d));
      RETURN_IF_ERROR(be->default_stream().Synchronize());
      t.tensor = std::move(d);
    }
    tensors.push_back(std::move(t));
  }
  int64_t total_bytes = 0;
  for (const ShardedTensor& t : tensors) total_bytes += t.global_shape.numel() * 4;

  if (args.rank == 0) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  RETURN_IF_ERROR(Barrier(w));
  CheckpointOptions ckpt_options;
  ckpt_options.dir = dir;
  ckpt_options.keep_last = 1;
  ckpt_options.host_bucket_bytes = bucket_mb << 20;
  ckpt_options.stage_host_tensors = stage;
  ASSIGN_OR_RETURN(auto ckpt, Checkpointer::Create(w, l, ckpt_options));

  double best_save = 1e30, best_load = 1e30, best_write = 1e30, best_read = 1e30;
  for (int rep = 0; rep < reps; ++rep) {
    TrainState state;
    state.step = rep + 1;
    RETURN_IF_ERROR(Barrier(w));
    auto start = Clock::now();
    RETURN_IF_ERROR(ckpt->Save(state, tensors, ""));
    RETURN_IF_ERROR(Barrier(w));
    best_save = std::min(best_save, Seconds(start));
    const std::string path = absl::StrCat(dir, "/", absl::StrFormat("step_%08d", rep + 1));
    if (args.rank == 0) DropCache(path);
    RETURN_IF_ERROR(Barrier(w));
    start = Clock::now();
    ASSIGN_OR_RETURN(LoadedCheckpoint loaded, ckpt->Load(path, tensors));
    RETURN_IF_ERROR(Barrier(w));
    best_load = std::min(best_load, Seconds(start));
    // The baseline, alone on the disk.
    if (args.rank == 0) {
      double ws = 0, rs = 0;
      RETURN_IF_ERROR(PlainWriteRead(dir + "/plain.bin", total_bytes, &ws, &rs));
      best_write = std::min(best_write, ws);
      best_read = std::min(best_read, rs);
    }
    RETURN_IF_ERROR(Barrier(w));
  }
  if (args.rank == 0) std::filesystem::remove_all(dir);
  const double gb = total_bytes / 1e9;
  auto params = [&](const char* op) {
    return std::vector<std::pair<std::string, std::string>>{
        {"op", op},
        {"ranks", absl::StrCat(args.world)},
        {"tp", absl::StrCat(l.tp)},
        {"ep", absl::StrCat(l.ep)},
        {"dp", absl::StrCat(l.dp)},
        {"device", stage ? std::string("cpu (staged)") : placement},
        {"bucket_MB", absl::StrCat(bucket_mb)},
        {"MB", absl::StrFormat("%.0f", total_bytes / 1e6)}};
  };
  reporter.Add(
      {params("save"),
       {{"ckpt", gb / best_save, "GB/s"}, {"plain", gb / best_write, "GB/s"}, {"time", best_save, "s"}},
       "vs_plain",
       best_write / best_save});
  reporter.Add(
      {params("load"),
       {{"ckpt", gb / best_load, "GB/s"}, {"plain", gb / best_read, "GB/s"}, {"time", best_load, "s"}},
       "vs_plain",
       best_read / best_load});
  reporter.Note(absl::StrCat(
      "save = Checkpointer::Save (sync; data + fsync + manifest + rename + latest); load = "
      "Checkpointer::Load with "
      "checksums, page cache dropped first; plain = one process write()+fsync / read() of the same ",
      total_bytes, " bytes in the same directory; best of ", reps, "; target ratio >= 0.5"));
  return absl::OkStatus();
}

Registrar reg("ckpt", "sharded checkpoint save/load GB/s vs a plain sequential write/read of the same bytes",
              RunCkpt);

}  // namespace
}  // namespace moe::bench
