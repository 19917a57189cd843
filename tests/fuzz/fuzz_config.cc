// libFuzzer: the job config (protobuf text), the command-line overrides and
// everything moe-train does with them before any work: defaults, validation,
// the config agreement's flattening and the peak-memory estimate. Input: the
// config text, then after a line "--" one override per line.
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "runtime/core/memory_model.h"
#include "runtime/job_config.h"
#include "runtime/startup_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t split = input.find("\n--\n");
  const std::string text = input.substr(0, split);
  std::vector<std::string> overrides;
  if (split != std::string::npos)
    overrides = absl::StrSplit(input.substr(split + 4), '\n', absl::SkipEmpty());
  auto config = moe::ParseConfigText(text, "fuzz.textproto");
  if (!config.ok()) return 0;
  (void)moe::ApplyOverrides(overrides, &*config);
  for (int world : {1, 4}) {
    moe::JobConfig c = *config;
    moe::ApplyDefaults(world, &c);
    const std::vector<std::string> problems = moe::ValidateJobConfig(c, world);
    const std::vector<std::string> flat = moe::FlattenConfig(c);
    (void)moe::ConfigHash(flat);
    (void)moe::DescribeConfigDisagreement({flat, moe::FlattenConfig(*config)});
    if (problems.empty()) (void)moe::CheckMemoryFits(c, 2, int64_t{1} << 34);
  }
  return 0;
}
