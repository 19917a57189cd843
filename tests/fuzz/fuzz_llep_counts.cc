// libFuzzer: the LLEP count-table reader (moe-bench llep-plan counts=FILE),
// the knobs it carries and the planner on whatever table and knobs they
// accept, as moe-bench runs them. Input: the JSON file.
#include <string>

#include "parallel/llep_planner.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto table = moe::parallel::ParseLlepCountTable(text, "fuzz.json");
  if (!table.ok()) return 0;
  size_t cells = 0;
  for (const auto& row : table->counts) cells += row.size();
  if (cells > 4096) return 0;  // the planner's cost, not its correctness
  auto options = moe::parallel::LlepOptionsFromKnobs(
      [&](const char* name, double fallback) { return table->Knob(name, fallback); });
  if (!options.ok()) return 0;
  auto plan = moe::parallel::PlanLlep(table->counts, *options);
  if (plan.ok()) (void)moe::parallel::PlanToJson(*plan);
  return 0;
}
