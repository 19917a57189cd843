// Global gradient norm, clipping and the non-finite gradient check, over all
// ranks of any (tp, ep, dp) layout.
//
// The global norm is that of the full (unsharded, un-replicated) model
// gradient: every shard counts exactly once. Each rank adds the squares of the
// gradients it "owns" for counting purposes, in double:
//   - dense parameters only on dp_rank 0 (they are replicated over DP);
//     TP-sharded ones (shard.tp_dim >= 0) on every TP rank, TP-replicated ones
//     on tp_rank 0 only;
//   - expert parameters only on edp_rank 0 (replicated over EDP; the EP ranks
//     hold different experts); TP-sharded ones on every TP rank, TP-replicated
//     ones on tp_rank 0 only;
// and one AllReduce(sum) over the world adds the rank sums.
//
// On the device, no host waits but one: the sums of squares (one per counted
// tensor, each accumulated in double by the kernel and stored in f32), their
// sum and the world all-reduce are ordered on the gradients' default stream
// (data plane); the host then reads the one f32 result (the step's one small
// host read, which also gives the trainer its finiteness check). Clipping
// enqueues the scaling on the same stream and returns.
//
// Collective: every rank of the world calls these with its own ParameterList
// (the same parameter names in the same order on every rank, as the model
// registers them). Gradients must already be reduced over DP / EDP. The
// communicator may take host (MPI) or device (NCCL) buffers; both work.
#ifndef MOE_OPTIM_CLIP_H_
#define MOE_OPTIM_CLIP_H_

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "parallel/parameter.h"
#include "parallel/process_groups.h"

namespace moe::optim {

// Does this rank count `p` in the global norm (see above)?
bool CountsInGlobalNorm(const parallel::Parameter& p, const parallel::RankLayout& layout);

// The global L2 norm of all gradients (sqrt of the world sum of squares).
// Non-finite when any gradient is.
absl::StatusOr<double> GlobalGradNorm(const parallel::ParameterList& params,
                                      const parallel::ProcessGroups& groups);

// The factor clipping multiplies the gradients by: min(1, max_norm / (norm +
// 1e-6)) (torch.nn.utils.clip_grad_norm_); 1 when max_norm <= 0 (optim.clip_grad
// off) or the norm is not finite.
double ClipCoefficient(double norm, double max_norm);

// Computes the global norm (returned, before clipping) and multiplies every
// local gradient by ClipCoefficient(norm, max_norm) when that is below 1. A
// non-finite norm leaves the gradients untouched (the trainer stops then).
// The trainer instead passes the coefficient to Optimizer::Step, which
// scales the gradients as it reads them (no pass over them of its own).
absl::StatusOr<double> ClipGradNorm(const parallel::ParameterList& params,
                                    const parallel::ProcessGroups& groups, double max_norm);

// The first parameter (in list order) with a NaN or Inf gradient element on
// any rank, or nullopt when all gradients are finite everywhere. Every rank gets
// the same answer. It reads every gradient on the host and agrees over the host
// world group: for error reports (the trainer calls it only when the global
// norm is not finite), not for every step. On a device whose memory the host cannot read, a tensor is
// checked through its f32 sum of squares, which also flags finite gradients
// whose squares overflow f32 (norm above ~1.8e19).
absl::StatusOr<std::optional<std::string>> FirstNonFiniteGrad(const parallel::ParameterList& params,
                                                              const parallel::ProcessGroups& groups);

// The first of `tensors` (name, tensor; in list order) holding a NaN or Inf
// element on any rank of `world`, or nullopt when every one is finite
// everywhere. Collective over `world`; every rank gets the same answer. The
// checkpoint save refuses non-finite parameters and optimizer state with it.
absl::StatusOr<std::optional<std::string>> FirstNonFiniteTensor(
    const std::vector<std::pair<std::string, Tensor>>& tensors, comm::Communicator& world);

}  // namespace moe::optim

#endif  // MOE_OPTIM_CLIP_H_
