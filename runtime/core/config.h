// Loading the job configuration (config.proto): text format, overrides, defaults.
#ifndef MOE_RUNTIME_CORE_CONFIG_H_
#define MOE_RUNTIME_CORE_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/core/config.pb.h"

namespace moe {

using config::JobConfig;

// Parses text-format `text`; errors carry "<source>:<line>:<col>: <parser message>"
// (unknown fields, malformed values, bad syntax), all of them at once.
absl::StatusOr<JobConfig> ParseConfigText(absl::string_view text, absl::string_view source);

// Reads and parses a .textproto file.
absl::StatusOr<JobConfig> LoadConfigFile(const std::string& path);

// Applies one "field.path=value" override to a scalar field, checking the
// path and the value's type: "model.hidden_size=256", "train.run_dir=runs/x".
absl::Status ApplyOverride(absl::string_view assignment, JobConfig* config);

// Applies every override, reporting all bad ones at once.
absl::Status ApplyOverrides(const std::vector<std::string>& assignments, JobConfig* config);

// Fills every unset field with its default (config.proto documents each one).
// Defaults that depend on the job's size (parallel.data) use `world_size`.
void ApplyDefaults(int world_size, JobConfig* config);

// The text format of `config`, every field that is set, one per line.
std::string ConfigToText(const JobConfig& config);

// Is layer `layer` a MoE layer (docs/model.md: l % n == n - 1)?
bool IsMoeLayer(const config::ModelConfig& model, int layer);

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_CONFIG_H_
