// The job's configuration as the trainer sees it: loaded, overridden,
// defaulted and validated against the world it runs in.
#ifndef MOE_RUNTIME_JOB_CONFIG_H_
#define MOE_RUNTIME_JOB_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/core/config.h"

namespace moe {

// Every problem of `config` (defaults applied) for a job of `world_size` ranks,
// each naming the field, its value and the fix. Empty when the config is valid.
std::vector<std::string> ValidateJobConfig(const JobConfig& config, int world_size);

// Loads `path`, applies `overrides` and the defaults, and validates. On error
// the status message lists every problem, one per line.
absl::StatusOr<JobConfig> ResolveJobConfig(const std::string& path,
                                           const std::vector<std::string>& overrides, int world_size);

}  // namespace moe

#endif  // MOE_RUNTIME_JOB_CONFIG_H_
