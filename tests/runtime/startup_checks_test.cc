// The start-up checks of moe-train (issue 18): config agreement across ranks,
// non-finite settings, the memory estimate against what is available, and the
// directory probe.
#include "runtime/startup_checks.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/job_config.h"

namespace moe {
namespace {

JobConfig Resolved(const std::string& text) {
  JobConfig c = ParseConfigText(text, "test.textproto").value();
  c.mutable_data()->set_train_path("corpus");
  ApplyDefaults(2, &c);
  return c;
}

TEST_CASE("ranks that agree produce the same flattened config and hash") {
  JobConfig a = Resolved("model { hidden_size: 64 }"), b = Resolved("model { hidden_size: 64 }");
  CHECK(FlattenConfig(a) == FlattenConfig(b));
  CHECK(ConfigHash(FlattenConfig(a)) == ConfigHash(FlattenConfig(b)));
  CHECK(DescribeConfigDisagreement({FlattenConfig(a), FlattenConfig(b)}).empty());
}

TEST_CASE("the first differing field is named with the ranks holding each value") {
  JobConfig a = Resolved(""), b = Resolved("model { hidden_size: 64 } train { seed: 7 }");
  std::vector<std::vector<std::string>> per_rank = {FlattenConfig(a), FlattenConfig(a), FlattenConfig(a),
                                                    FlattenConfig(b)};
  CHECK(ConfigHash(per_rank[0]) != ConfigHash(per_rank[3]));
  CHECK(DescribeConfigDisagreement(per_rank) == "model.hidden_size is 128 on ranks 0-2 but 64 on rank 3");
  // Doubles compare at full precision: 3e-4 and 3.0000001e-4 differ.
  JobConfig c = Resolved("optim { lr: 0.00030000001 }");
  CHECK(DescribeConfigDisagreement({FlattenConfig(a), FlattenConfig(c), FlattenConfig(a)}) ==
        "optim.lr is 0.0003 on ranks 0, 2 but 0.00030000001 on rank 1");
}

TEST_CASE("non-finite settings are refused, naming the field") {
  for (auto [text, field] : {std::pair<const char*, const char*>{"optim { lr: inf }", "optim.lr = inf"},
                             {"optim { clip_grad: nan }", "optim.clip_grad = nan"},
                             {"model { moe { aux_loss_coeff: nan } }", "model.moe.aux_loss_coeff = nan"},
                             {"model { moe { capacity_factor: -inf } }", "model.moe.capacity_factor = -inf"},
                             {"llep { p2p_gbps: nan }", "llep.p2p_gbps = nan"}}) {
    std::vector<std::string> p = ValidateJobConfig(Resolved(text), 2);
    REQUIRE(!p.empty());
    CHECK(p[0] == std::string(field) + " must be a finite number; remove it to get the default");
  }
}

TEST_CASE("a job that cannot fit names the estimate and the largest terms") {
  JobConfig c = Resolved("");
  CHECK(CheckMemoryFits(c, 4, int64_t{1} << 40).ok());
  absl::Status s = CheckMemoryFits(c, 4, 1 << 20);
  REQUIRE(s.code() == absl::StatusCode::kResourceExhausted);
  const std::string m(s.message());
  CHECK(m.find("predicted peak") != std::string::npos);
  CHECK(m.find("x 4 ranks on this node") != std::string::npos);
  CHECK(m.find("Largest terms per rank") != std::string::npos);
  // No estimate to compare with: nothing is refused.
  CHECK(CheckMemoryFits(c, 4, -1).ok());
  CHECK(AvailableMemoryBytes() > 0);
}

TEST_CASE("the directory probe creates the directory and leaves nothing in it") {
  const std::string root = std::filesystem::temp_directory_path() / "moe_probe_test";
  std::filesystem::remove_all(root);
  REQUIRE(ProbeWritableDirectory(root + "/a/b", "checkpoint.dir").ok());
  CHECK(std::filesystem::is_empty(root + "/a/b"));
  { std::ofstream(root + "/file") << "x"; }
  absl::Status s = ProbeWritableDirectory(root + "/file", "checkpoint.dir");
  CHECK(s.message().find("checkpoint.dir = '") != absl::string_view::npos);
  CHECK(s.message().find("is not usable") != absl::string_view::npos);
  std::ifstream in(root + "/file");
  std::string kept;
  in >> kept;
  CHECK(kept == "x");  // nothing lost
  CHECK_FALSE(ProbeWritableDirectory(root + "/" + std::string(300, 'x'), "train.run_dir").ok());
  std::filesystem::remove_all(root);
}

TEST_CASE("a checkpoint directory is locked for one job; a dead job's lock is taken over") {
  const std::string dir = std::filesystem::temp_directory_path() / "moe_lock_test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  { std::ofstream(dir + "/keep") << "data"; }
  {
    absl::StatusOr<DirectoryLock> first = DirectoryLock::Acquire(dir, "checkpoint.dir");
    REQUIRE(first.ok());
    // flock(2) locks are per open file: a second Acquire conflicts even here.
    absl::StatusOr<DirectoryLock> second = DirectoryLock::Acquire(dir, "checkpoint.dir");
    REQUIRE_FALSE(second.ok());
    const std::string m(second.status().message());
    CAPTURE(m);
    CHECK(m.find("checkpoint.dir = '" + dir + "' is in use by another job (host ") != std::string::npos);
    CHECK(m.find(" pid " + std::to_string(::getpid()) + " since ") != std::string::npos);
  }
  // The holder is gone (its lock went with it); the file still names it.
  { std::ofstream(dir + "/.lock") << "host elsewhere pid 999999 since 2020-01-01 00:00:00 UTC\n"; }
  REQUIRE(DirectoryLock::Acquire(dir, "checkpoint.dir").ok());
  std::ifstream in(dir + "/keep");
  std::string kept;
  in >> kept;
  CHECK(kept == "data");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
