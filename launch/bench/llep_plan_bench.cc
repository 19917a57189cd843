// moe-bench llep-plan: plans one MoE layer offline from a count table, so the
// LLEP knobs can be tuned without a job.
//
//   moe-bench llep-plan counts=FILE [trigger_ratio=1.3] [capacity_factor=1.0]
//       [min_tokens_per_gemm=1024] [max_borrowed_experts=0]
//       [hidden=512 expert_ffn=1024 gemm_gflops=100 p2p_gbps=10]   (cost model)
//
// FILE is JSON: {"counts": [[c_00, c_01, ...], ...]} with one row per EP rank
// and one column per expert (tokens rank r routes to expert e); knobs may also
// be given in the file. Prints the plan as one JSON object: ranges per expert,
// loads per rank before and after, imbalance, weight moves.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "launch/bench/bench.h"
#include "parallel/llep_planner.h"
#include "runtime/core/status.h"

namespace moe::bench {
namespace {

absl::Status RunLlepPlan(const Args& args, Reporter&) {
  std::string path = args.Str("counts", "");
  if (path.empty()) {
    return absl::InvalidArgumentError("llep-plan needs counts=FILE (JSON: {\"counts\": [[...], ...]})");
  }
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("llep-plan: cannot open counts file '", path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  ASSIGN_OR_RETURN(parallel::LlepCountTable table, parallel::ParseLlepCountTable(text.str(), path));
  const std::vector<std::vector<int64_t>>& counts = table.counts;
  auto knob = [&](const char* name, double fallback) {
    return args.Double(name, table.Knob(name, fallback));
  };
  ASSIGN_OR_RETURN(parallel::LlepOptions o, parallel::LlepOptionsFromKnobs(knob));
  ASSIGN_OR_RETURN(parallel::LlepPlan plan, parallel::PlanLlep(counts, o));
  if (args.rank == 0) std::printf("%s\n", parallel::PlanToJson(plan).c_str());
  return absl::OkStatus();
}

Registrar reg("llep-plan", "plan one MoE layer from a JSON count table (tune LLEP knobs offline)",
              RunLlepPlan);

}  // namespace
}  // namespace moe::bench
