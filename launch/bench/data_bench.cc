// moe-bench data: the cost of reading training samples from a Megatron
// .bin/.idx pair (data/indexed_dataset.h) against two baselines measured in the
// same run, on the same sample positions, the file hot in the page cache:
//
//   mapped: the reader before bounded reads: the whole .bin memory-mapped, its
//           size checked with fstat, the sequence holding the first token
//           found, each sequence's part widened from the mapping to int32 (a
//           .bin truncated under it raises SIGBUS between check and copy);
//   pread:  one pread(2) of the sample's bytes (the file is contiguous), then
//           the same widening: a bounded read with no size check and no index.
//
//   moe-bench data [tokens=16000000] [doc_tokens=200] [seq_len=2048] [samples=2000] [rounds=41]
//
// The three (and a bare fstat, the reader's size check) are interleaved round
// by round, each round reading the same `samples` samples; each figure is the
// median round's ns per sample, the ratio reader / mapped. Documents are written back to back
// (as moe-preprocess and Megatron do), so a sample spans about
// seq_len / doc_tokens sequences.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "data/indexed_dataset.h"
#include "launch/bench/bench.h"
#include "runtime/core/status.h"

namespace moe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

absl::Status RunData(const Args& args, Reporter& reporter) {
  const int64_t tokens = args.Int("tokens", 16000000);
  const int64_t doc_tokens = std::max<long>(1, args.Int("doc_tokens", 200));
  const int64_t seq_len = args.Int("seq_len", 2048);
  const int64_t samples = std::max<long>(1, args.Int("samples", 2000));
  const int rounds = std::max<int>(1, static_cast<int>(args.Int("rounds", 41)));
  if (tokens < seq_len + 1 || seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("data: tokens = ", tokens, " must exceed seq_len = ", seq_len, " (both positive)"));
  }
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("moe_bench_data_", ::getpid(), "_", args.rank))
          .string();
  std::filesystem::create_directories(dir);
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir};
  const std::string prefix = dir + "/corpus";
  {
    ASSIGN_OR_RETURN(auto writer, data::IndexedDatasetWriter::Create(prefix, 32000));
    std::vector<int32_t> doc(doc_tokens);
    for (int64_t done = 0, d = 0; done < tokens; done += doc_tokens, ++d) {
      const int64_t n = std::min(doc_tokens, tokens - done);
      for (int64_t j = 0; j < n; ++j) doc[j] = static_cast<int32_t>((d * 131 + j) % 32000);
      RETURN_IF_ERROR(writer->AddDocument(doc.data(), n));
    }
    RETURN_IF_ERROR(writer->Finish());
  }
  ASSIGN_OR_RETURN(std::unique_ptr<data::IndexedDataset> ds, data::IndexedDataset::Open(prefix));
  const int64_t count = seq_len + 1;
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int64_t> pick(0, ds->num_tokens() - count);
  std::vector<int64_t> begins(samples);
  for (int64_t& b : begins) b = pick(rng);

  const std::string bin = data::BinPath(prefix);
  const int fd = ::open(bin.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat(bin, ": cannot open"));
  const size_t bin_size = std::filesystem::file_size(bin);
  void* map = mmap(nullptr, bin_size, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(bin, ": mmap failed"));
  }
  const auto* mapped = static_cast<const uint8_t*>(map);
  std::vector<int32_t> out(count);
  std::vector<uint16_t> raw(count);
  int64_t checksum = 0;

  auto reader = [&]() -> absl::Status {
    for (int64_t b : begins) {
      RETURN_IF_ERROR(ds->Read(b, count, out.data()));
      checksum += out[count - 1];
    }
    return absl::OkStatus();
  };
  // The mapped reader as it was (IndexedDataset::Read before bounded reads):
  // the size check, the sequence holding the first token, then each
  // sequence's part copied from the mapping.
  const std::vector<int32_t>& lengths = ds->sequence_lengths();
  const std::vector<int64_t>& pointers = ds->sequence_pointers();
  std::vector<int64_t> offsets(lengths.size() + 1, 0);
  for (size_t i = 0; i < lengths.size(); ++i) offsets[i + 1] = offsets[i] + lengths[i];
  auto map_read = [&]() -> absl::Status {
    for (int64_t b : begins) {
      struct stat st;
      if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < bin_size) {
        return absl::DataLossError("the .bin shrank");
      }
      int64_t s =
          static_cast<int64_t>(std::upper_bound(offsets.begin(), offsets.end(), b) - offsets.begin()) - 1;
      int64_t pos = b, left = count;
      int32_t* dst = out.data();
      while (left > 0) {
        while (offsets[s + 1] <= pos) ++s;
        const int64_t take = std::min(left, offsets[s + 1] - pos);
        const uint8_t* p = mapped + pointers[s] + (pos - offsets[s]) * 2;
        for (int64_t j = 0; j < take; ++j) {
          uint16_t v;
          std::memcpy(&v, p + 2 * j, 2);
          dst[j] = v;
        }
        dst += take;
        pos += take;
        left -= take;
      }
      checksum += out[count - 1];
    }
    return absl::OkStatus();
  };
  auto pread_read = [&]() -> absl::Status {
    for (int64_t b : begins) {
      const size_t bytes = static_cast<size_t>(2 * count);
      if (::pread(fd, raw.data(), bytes, 2 * b) != static_cast<ssize_t>(bytes)) {
        return absl::DataLossError("short read");
      }
      for (int64_t j = 0; j < count; ++j) out[j] = raw[j];
      checksum += out[count - 1];
    }
    return absl::OkStatus();
  };
  auto fstat_only = [&]() -> absl::Status {
    for (int64_t i = 0; i < samples; ++i) {
      struct stat st;
      if (fstat(fd, &st) != 0) return absl::InternalError("fstat failed");
      checksum += st.st_size & 1;
    }
    return absl::OkStatus();
  };
  auto time = [&](auto& fn, std::vector<double>* ns) -> absl::Status {
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(fn());
    ns->push_back(std::chrono::duration<double, std::nano>(Clock::now() - t0).count() /
                  static_cast<double>(samples));
    return absl::OkStatus();
  };
  std::vector<double> reader_ns, map_ns, pread_ns, fstat_ns;
  absl::Status status = absl::OkStatus();
  // A warm-up round of each, then `rounds` interleaved.
  for (int r = -1; r < rounds && status.ok(); ++r) {
    std::vector<double> warm;
    status.Update(time(reader, r < 0 ? &warm : &reader_ns));
    if (status.ok()) status.Update(time(map_read, r < 0 ? &warm : &map_ns));
    if (status.ok()) status.Update(time(pread_read, r < 0 ? &warm : &pread_ns));
    if (status.ok()) status.Update(time(fstat_only, r < 0 ? &warm : &fstat_ns));
  }
  munmap(map, bin_size);
  ::close(fd);
  RETURN_IF_ERROR(status);

  Measurement m;
  m.params = {{"tokens", absl::StrCat(ds->num_tokens())},
              {"doc_tokens", absl::StrCat(doc_tokens)},
              {"seq_len", absl::StrCat(seq_len)},
              {"samples", absl::StrCat(samples)}};
  const double reader_med = Median(reader_ns), map_med = Median(map_ns), pread_med = Median(pread_ns);
  m.figures = {{"reader", reader_med, "ns/sample"},
               {"mapped", map_med, "ns/sample"},
               {"pread", pread_med, "ns/sample"},
               {"fstat", Median(fstat_ns), "ns/call"},
               {"reader_vs_pread", reader_med / pread_med, "x"}};
  m.ratio_name = "reader_vs_mapped";
  m.ratio = reader_med / map_med;
  reporter.Add(std::move(m));
  reporter.Note(absl::StrCat("median of ", rounds, " interleaved rounds; checksum ", checksum));
  return absl::OkStatus();
}

Registrar reg("data", "reading training samples from a .bin/.idx: the reader vs mmap and pread baselines",
              RunData);

}  // namespace
}  // namespace moe::bench
