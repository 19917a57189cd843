#include "runtime/host_syncs.h"

#include "absl/strings/str_cat.h"
#include "runtime/core/config.h"

namespace moe {

std::string HostSyncBudget::ToString() const {
  return absl::StrCat(total(), " host waits per step = ", micro_batches, " micro-batches x ", moe_layers,
                      " MoE layers x ", per_moe_layer, " + ", per_step, " per step");
}

HostSyncBudget HostSyncsPerStep(const JobConfig& config, int world) {
  const config::ModelConfig& m = config.model();
  const int tp = config.parallel().tensor(), ep = config.parallel().expert();
  const int dp = world / tp;
  const bool bias = m.moe().expert_bias_update_rate() > 0;
  HostSyncBudget b;
  b.micro_batches = config.train().grad_accum();
  for (int l = 0; l < m.num_layers(); ++l) b.moe_layers += IsMoeLayer(m, l) ? 1 : 0;
  b.per_moe_layer = 1;                                           // routing read (bias, gate included)
  b.per_moe_layer += config.llep().enabled() && ep > 1 ? 1 : 0;  // LLEP counts
  // The count exchange: LLEP's gather stands in for it (model/llep.h).
  b.per_moe_layer += ep > 1 && !config.llep().enabled() ? 1 : 0;
  b.per_moe_layer += m.moe().erc_loss_coeff() > 0 ? 1 : 0;  // the coupling loss's norms
  // data agreement, metrics, grad norm (the losses' read lands with it), step
  // end (the new biases' read lands with it), profile
  b.per_step = (world > 1 ? 1 : 0) + (dp > 1 ? 1 : 0) + 1 + 1 + (world > 1 ? 1 : 0);
  if (bias && b.moe_layers > 0) b.per_step += dp > 1 ? 1 : 0;  // the load sum
  return b;
}

}  // namespace moe
