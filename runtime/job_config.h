// The job's configuration as the trainer sees it: loaded, overridden,
// defaulted and validated against the world it runs in.
#ifndef MOE_RUNTIME_JOB_CONFIG_H_
#define MOE_RUNTIME_JOB_CONFIG_H_

#include <cstdint>
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
absl::StatusOr<JobConfig> ResolveJobConfig(const std::string& path, const std::vector<std::string>& overrides,
                                           int world_size);

// One "field.path: value" line per scalar field of `config`, in the proto's
// field order, unset fields as "field.path: (unset)": the same number of lines
// in the same order for any config of this build, so that ranks can compare
// theirs line by line.
std::vector<std::string> FlattenConfig(const JobConfig& config);

// A 64-bit FNV-1a hash of the flattened lines (equal configs, equal hashes).
uint64_t ConfigHash(const std::vector<std::string>& flat);

// Given every rank's FlattenConfig (index = world rank), the first field on
// which they disagree with the ranks holding each value, e.g.
//   "model.hidden_size is 128 on ranks 0-2 but 64 on rank 3"
// Empty when every rank holds the same config.
std::string DescribeConfigDisagreement(const std::vector<std::vector<std::string>>& per_rank);

}  // namespace moe

#endif  // MOE_RUNTIME_JOB_CONFIG_H_
