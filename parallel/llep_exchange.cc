#include "parallel/llep_exchange.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "parallel/token_exchange.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::parallel {
namespace {

// Row of expert e in the borrowed stack.
int64_t BorrowedRow(absl::Span<const int64_t> borrowed, int64_t e) {
  return std::lower_bound(borrowed.begin(), borrowed.end(), e) - borrowed.begin();
}

// `dtype`: the stack's element type (weights: f32, or bf16 compute copies
// under train.precision bf16; gradients: f32).
absl::Status CheckStack(const char* what, const ExpertTensors& t, int64_t rows, DType dtype = DType::kF32) {
  for (const Tensor* m : {&t.gate, &t.up, &t.down}) {
    if (!m->defined() || m->rank() != 3 || m->dtype() != dtype || m->size(0) < rows) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": expert tensor ",
                                                     m->defined() ? m->ToString() : "undefined", " must be ",
                                                     DTypeName(dtype), " [n >= ", rows, ", ., .]"));
    }
  }
  if (t.gate.shape() != t.up.shape() || t.down.numel() != t.gate.numel()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": gate ", t.gate.ToString(), ", up ",
                                                   t.up.ToString(), " and down ", t.down.ToString(),
                                                   " are not one expert stack"));
  }
  return absl::OkStatus();
}

std::vector<Tensor> Keep(const ExpertTensors& a, const ExpertTensors& b) {
  std::vector<Tensor> keep;
  for (const ExpertTensors* t : {&a, &b}) {
    for (const Tensor* m : {&t->gate, &t->up, &t->down})
      if (m->defined()) keep.push_back(*m);
  }
  return keep;
}

// Enqueues `ops` on ep_p2p's side stream after `stream`'s work.
absl::StatusOr<std::shared_ptr<Event>> StartP2P(comm::Communicator& ep_p2p, Stream& stream,
                                                std::vector<comm::P2POp> ops, std::vector<Tensor> keep) {
  if (ops.empty()) return std::shared_ptr<Event>();
  auto enqueue = [&](Stream& side) { return ep_p2p.GroupP2P(ops, side); };
  return EnqueueOnSideStream(ep_p2p, stream, enqueue, std::move(keep));
}

}  // namespace

absl::StatusOr<std::vector<std::vector<int64_t>>> GatherExpertCounts(comm::Communicator& host_ep,
                                                                     absl::Span<const int64_t> counts) {
  if (!host_ep.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat("GatherExpertCounts: '", host_ep.name(),
                                                   "' is a device communicator; pass the EP group's host "
                                                   "communicator (ProcessGroups::host.ep)"));
  }
  const int P = host_ep.size();
  const size_t E = counts.size();
  std::vector<int64_t> table(static_cast<size_t>(P) * E);
  ASSIGN_OR_RETURN(comm::Work w, host_ep.AllGather(counts.data(), table.data(), E, DType::kI64));
  absl::Status st = w.Wait();  // the planner runs on the host: a host read by nature
  if (!st.ok()) return Annotate(st, "LLEP count gather");
  std::vector<std::vector<int64_t>> out(P, std::vector<int64_t>(E));
  for (int p = 0; p < P; ++p) std::copy_n(table.begin() + static_cast<size_t>(p) * E, E, out[p].begin());
  return out;
}

std::vector<int64_t> BorrowedExperts(const LlepPlan& plan, int rank) {
  std::vector<int64_t> experts;
  for (const LlepWeightMove& m : plan.weight_moves)
    if (m.dst == rank) experts.push_back(m.expert);
  std::sort(experts.begin(), experts.end());
  return experts;
}

absl::StatusOr<std::shared_ptr<Event>> StartWeightMoves(comm::Communicator& ep_p2p, Stream& stream,
                                                        const LlepPlan& plan, int64_t expert_begin,
                                                        const ExpertTensors& local,
                                                        const ExpertTensors& borrowed) {
  const int me = ep_p2p.rank();
  const std::vector<int64_t> experts = BorrowedExperts(plan, me);
  const DType dt = local.gate.defined() ? local.gate.dtype() : DType::kF32;
  if (dt != DType::kF32 && dt != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("StartWeightMoves: expert weights ", local.gate.ToString(), " must be f32 or bf16"));
  }
  RETURN_IF_ERROR(CheckStack("StartWeightMoves (local)", local, 1, dt));
  if (!experts.empty()) {
    RETURN_IF_ERROR(
        CheckStack("StartWeightMoves (borrowed)", borrowed, static_cast<int64_t>(experts.size()), dt));
  }
  const size_t numel = static_cast<size_t>(local.gate.Select(0).numel());
  std::vector<comm::P2POp> ops;
  for (const LlepWeightMove& m : plan.weight_moves) {
    if (m.src == me) {
      const int64_t i = m.expert - expert_begin;
      for (const Tensor* t : {&local.gate, &local.up, &local.down})
        ops.push_back(comm::P2POp::Send(t->Select(i).raw_data(), numel, dt, m.dst));
    } else if (m.dst == me) {
      const int64_t b = BorrowedRow(experts, m.expert);
      for (const Tensor* t : {&borrowed.gate, &borrowed.up, &borrowed.down})
        ops.push_back(comm::P2POp::Recv(t->Select(b).raw_data(), numel, dt, m.src));
    }
  }
  return StartP2P(ep_p2p, stream, std::move(ops), Keep(local, borrowed));
}

absl::Status ReturnExpertGradients(comm::Communicator& ep_p2p, Stream& stream, const LlepPlan& plan,
                                   int64_t expert_begin, const ExpertTensors& borrowed_grads,
                                   const ExpertTensors& local_grads) {
  const int me = ep_p2p.rank();
  const std::vector<int64_t> experts = BorrowedExperts(plan, me);
  RETURN_IF_ERROR(CheckStack("ReturnExpertGradients (local)", local_grads, 1));
  if (!experts.empty()) {
    RETURN_IF_ERROR(
        CheckStack("ReturnExpertGradients (borrowed)", borrowed_grads, static_cast<int64_t>(experts.size())));
  }
  // One incoming stack row per move this rank owns, in plan order.
  std::vector<int64_t> owned;
  for (const LlepWeightMove& m : plan.weight_moves)
    if (m.src == me) owned.push_back(m.expert - expert_begin);
  const int64_t n = static_cast<int64_t>(owned.size());
  ExpertTensors incoming;
  if (n > 0) {
    const Shape g = local_grads.gate.shape(), d = local_grads.down.shape();
    ASSIGN_OR_RETURN(incoming.gate, Tensor::Empty(stream.backend(), Shape{n, g[1], g[2]}, DType::kF32,
                                                  MemoryCategory::kGradients));
    ASSIGN_OR_RETURN(incoming.up, Tensor::Empty(stream.backend(), Shape{n, g[1], g[2]}, DType::kF32,
                                                MemoryCategory::kGradients));
    ASSIGN_OR_RETURN(incoming.down, Tensor::Empty(stream.backend(), Shape{n, d[1], d[2]}, DType::kF32,
                                                  MemoryCategory::kGradients));
  }
  const size_t numel = static_cast<size_t>(local_grads.gate.Select(0).numel());
  std::vector<comm::P2POp> ops;
  int64_t next = 0;
  for (const LlepWeightMove& m : plan.weight_moves) {
    if (m.src == me) {
      for (const Tensor* t : {&incoming.gate, &incoming.up, &incoming.down})
        ops.push_back(comm::P2POp::Recv(t->Select(next).raw_data(), numel, DType::kF32, m.dst));
      ++next;
    } else if (m.dst == me) {
      const int64_t b = BorrowedRow(experts, m.expert);
      for (const Tensor* t : {&borrowed_grads.gate, &borrowed_grads.up, &borrowed_grads.down})
        ops.push_back(comm::P2POp::Send(t->Select(b).raw_data(), numel, DType::kF32, m.src));
    }
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Event> done,
                   StartP2P(ep_p2p, stream, std::move(ops), Keep(incoming, borrowed_grads)));
  if (done == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(stream.Wait(*done));
  // In plan order (expert, helper): the owner's sum is deterministic.
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = owned[k];
    RETURN_IF_ERROR(
        ops::Add(stream, local_grads.gate.Select(i), incoming.gate.Select(k), local_grads.gate.Select(i)));
    RETURN_IF_ERROR(
        ops::Add(stream, local_grads.up.Select(i), incoming.up.Select(k), local_grads.up.Select(i)));
    RETURN_IF_ERROR(
        ops::Add(stream, local_grads.down.Select(i), incoming.down.Select(k), local_grads.down.Select(i)));
  }
  return absl::OkStatus();
}

}  // namespace moe::parallel
