// TokenDispatcher: moves token copies from the tokens' order to the experts'
// order and back (Megatron's moe/token_dispatcher), in chunks whose transfers
// overlap the experts' compute. One interface, the pipelined one:
//
//   ForwardPipelined   x [T, d] + plan -> y [T, d],
//                      y_t = sum over kept assignments (t, e) of w_t,e * out_e(x_t),
//                      calling expert_fn once per chunk, in chunk order, with
//                      the chunk's rows grouped by expert;
//   BackwardPipelined  dy -> dx = the expert path's input gradient (dx is
//                      overwritten, never read: a fresh buffer needs no fill),
//                      and the combine weights' gradients (the router's input).
//
// Implementations: AllToAllTokenDispatcher (model/alltoall_dispatcher.h;
// expert parallelism, parallel.overlap_chunks chunks, the later chunks'
// exchanges in flight while earlier ones compute; LLEP's reroute) and
// LocalTokenDispatcher (one rank holds its experts: the one-chunk case,
// permuting within the rank). The MoE layer sees only this interface.
//
// Call order per micro-batch: ForwardPipelined, BackwardPipelined. A
// dispatcher keeps the state that ties them together.
#ifndef MOE_MODEL_TOKEN_DISPATCHER_H_
#define MOE_MODEL_TOKEN_DISPATCHER_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/common.h"
#include "model/router.h"

namespace moe::comm {
class Communicator;
}

namespace moe::model {

// Tokens grouped by local expert: rows [offsets[i], offsets[i + 1]) of `tokens`
// belong to local expert i (global expert expert_begin + i); an expert may own
// zero rows. offsets has E_local + 1 host values, offsets[0] = 0.
struct ExpertInput {
  Tensor tokens;  // [N, d]
  std::vector<int64_t> offsets;
};

// Where each assignment is computed when it is not the expert's owner (LLEP),
// and what this rank receives when the caller knows it.
struct Reroute {
  // [T * k]: the EP rank that computes assignment a = t * k + j; read for the
  // kept assignments of this rank's TED slice only. Empty: every assignment
  // goes to its expert's owner (standard EP).
  std::vector<int32_t> dst;
  // [C * P * E], index (c * P + src) * E + e: rows this rank receives in chunk
  // c from EP rank src for expert e, when the caller knows them (LLEP's count
  // gather: every rank derives them from the same table); the count exchange
  // is then skipped. Empty: the counts are exchanged as usual.
  std::vector<int64_t> recv_counts;
};

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  // The experts this rank owns: [expert_begin, expert_end) of E.
  virtual int64_t expert_begin() const = 0;
  virtual int64_t expert_end() const = 0;
  // Chunks per micro-batch (expert_fn calls per pass).
  virtual int num_chunks() const = 0;
  // The expert-parallel group the experts are spread over, or nullptr when
  // this rank holds all of them (what collectives over the experts, e.g. the
  // ERC loss's gather of its E x E matrix, run on).
  virtual comm::Communicator* ep_group() const { return nullptr; }
  // The TP group whose ranks split the tokens between them (DeepSpeed-TED's
  // duplicate-token dropping), or nullptr when every rank dispatches all its
  // tokens (required with experts sharded over TP: model::TedGroup).
  virtual comm::Communicator* ted_group() const { return nullptr; }

  // Computes one chunk's experts: rows [N, d] grouped by expert, expert e
  // (global index) at [offsets[e], offsets[e + 1]) (E + 1 values; without a
  // Reroute only this rank's experts have rows) -> [N, d] (forward: outputs;
  // backward: input grads from output grads).
  using ExpertFn =
      std::function<absl::StatusOr<Tensor>(int chunk, const Tensor& rows, absl::Span<const int64_t> offsets)>;
  // x [T, d] (unchanged until BackwardPipelined) -> y [T, d]; `plan` must
  // outlive the backward. `reroute` (null: every assignment goes to its
  // expert's owner) must stay valid during the call only; a dispatcher that
  // cannot reroute (local) refuses one.
  virtual absl::StatusOr<Tensor> ForwardPipelined(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                                  const ExpertFn& expert_forward, const Reroute* reroute) = 0;
  // dy [T, d] -> dx [T, d] = the expert path's input gradient (overwritten:
  // dx's contents are not read; tokens without a kept assignment get 0); *dweights
  // = f32 [T * k] on the stream's device: d loss / d w_t,e for all T tokens
  // (0 for dropped assignments), the router's backward input. Stream-ordered:
  // nothing is read on the host.
  virtual absl::Status BackwardPipelined(Stream& stream, const Tensor& dy, const ExpertFn& expert_backward,
                                         Tensor* dweights, const Tensor& dx) = 0;
};

// One rank holds the experts [expert_begin, expert_end) (all E when EP = 1):
// assignments to other experts are not computed here (with EP = 1 there are
// none). The pipelined interface is its one-chunk case: Dispatch, the experts,
// Combine; CombineBackward, the experts' backward, DispatchBackward.
class LocalTokenDispatcher : public TokenDispatcher {
 public:
  LocalTokenDispatcher(int64_t expert_begin, int64_t expert_end)
      : expert_begin_(expert_begin), expert_end_(expert_end) {}
  int64_t expert_begin() const override { return expert_begin_; }
  int64_t expert_end() const override { return expert_end_; }
  int num_chunks() const override { return 1; }

  absl::StatusOr<Tensor> ForwardPipelined(Stream& stream, const Tensor& x, const RoutingPlan& plan,
                                          const ExpertFn& expert_forward, const Reroute* reroute) override;
  absl::Status BackwardPipelined(Stream& stream, const Tensor& dy, const ExpertFn& expert_backward,
                                 Tensor* dweights, const Tensor& dx) override;

  // The steps: x [T, d] -> the local experts' rows (ExpertInput); their
  // outputs [N, d] -> y [T, d]; dy -> d outputs [N, d] and dweights f32 [T * k];
  // d inputs [N, d] -> dx = the scattered rows (overwritten; 0 for tokens without rows).
  absl::StatusOr<ExpertInput> Dispatch(Stream& stream, const Tensor& x, const RoutingPlan& plan);
  absl::StatusOr<Tensor> Combine(Stream& stream, const Tensor& expert_out);
  absl::StatusOr<Tensor> CombineBackward(Stream& stream, const Tensor& dy, Tensor* dweights);
  absl::Status DispatchBackward(Stream& stream, const Tensor& d_expert_in, const Tensor& dx);

 private:
  int64_t expert_begin_, expert_end_;
  int64_t num_tokens_ = 0, hidden_ = 0, num_assignments_ = 0;
  Tensor assignment_index_;  // i32 [N]: a = t * k + j of each row
  Tensor token_index_;       // i32 [N]: the token t of each row
  Tensor weights_;           // f32 [N]: w_t,e of each row
  Tensor by_token_;          // i32: ops::ScatterRowOrder(token_index_, T)
  Tensor by_assignment_;     // i32: ops::ScatterRowOrder(assignment_index_, T * k)
  Tensor expert_out_;
  std::vector<int64_t> offsets_;  // E + 1 global offsets of the forward's rows
};

}  // namespace moe::model

#endif  // MOE_MODEL_TOKEN_DISPATCHER_H_
