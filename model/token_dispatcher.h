// TokenDispatcher: moves token copies from the tokens' order to the experts'
// order and back (Megatron's moe/token_dispatcher).
//
//   Dispatch   x [T, d] + plan  ->  ExpertInput: the kept (token, expert)
//              assignments whose expert is LOCAL ([expert_begin, expert_end)),
//              grouped by local expert with per-expert row offsets
//   Combine    expert outputs [N, d] (Dispatch's row order)  ->  y [T, d],
//              y_t = sum over kept assignments (t, e) of w_t,e * out_e(x_t)
//
// and their backwards. The local dispatcher (one rank holds every expert)
// permutes within the rank; the all-to-all dispatcher of the parallel layer
// implements the same interface: Dispatch exchanges counts and rows with the
// EP group (so N counts rows received from every EP rank) and Combine sends
// them back before the weighted sum on the tokens' rank.
//
// Call order per micro-batch: Dispatch, Combine, CombineBackward,
// DispatchBackward. A dispatcher keeps the state that ties them together.
#ifndef MOE_MODEL_TOKEN_DISPATCHER_H_
#define MOE_MODEL_TOKEN_DISPATCHER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/common.h"
#include "model/router.h"

namespace moe::model {

// Tokens grouped by local expert: rows [offsets[i], offsets[i + 1]) of `tokens`
// belong to local expert i (global expert expert_begin + i); an expert may own
// zero rows. offsets has E_local + 1 host values, offsets[0] = 0.
struct ExpertInput {
  Tensor tokens;  // [N, d]
  std::vector<int64_t> offsets;
};

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  // The experts this rank computes: [expert_begin, expert_end) of E.
  virtual int64_t expert_begin() const = 0;
  virtual int64_t expert_end() const = 0;

  // x [T, d] must stay unchanged until DispatchBackward; `plan` must outlive
  // the four calls.
  virtual absl::StatusOr<ExpertInput> Dispatch(Stream& stream, const Tensor& x, const RoutingPlan& plan) = 0;
  // expert_out [N, d] (kept until CombineBackward) -> y [T, d].
  virtual absl::StatusOr<Tensor> Combine(Stream& stream, const Tensor& expert_out) = 0;
  // dy [T, d] -> d expert_out [N, d]; fills dweights [T * k] with d loss / d w_t,e
  // (0 for dropped assignments), the router's input.
  virtual absl::StatusOr<Tensor> CombineBackward(Stream& stream, const Tensor& dy,
                                                 std::vector<float>* dweights) = 0;
  // d expert_in [N, d] -> dx [T, d] += the scattered rows.
  virtual absl::Status DispatchBackward(Stream& stream, const Tensor& d_expert_in, const Tensor& dx) = 0;
};

// One rank holds the experts [expert_begin, expert_end) (all E when EP = 1):
// assignments to other experts are not computed here (with EP = 1 there are none).
class LocalTokenDispatcher : public TokenDispatcher {
 public:
  LocalTokenDispatcher(int64_t expert_begin, int64_t expert_end)
      : expert_begin_(expert_begin), expert_end_(expert_end) {}
  int64_t expert_begin() const override { return expert_begin_; }
  int64_t expert_end() const override { return expert_end_; }

  absl::StatusOr<ExpertInput> Dispatch(Stream& stream, const Tensor& x, const RoutingPlan& plan) override;
  absl::StatusOr<Tensor> Combine(Stream& stream, const Tensor& expert_out) override;
  absl::StatusOr<Tensor> CombineBackward(Stream& stream, const Tensor& dy,
                                         std::vector<float>* dweights) override;
  absl::Status DispatchBackward(Stream& stream, const Tensor& d_expert_in, const Tensor& dx) override;

 private:
  int64_t expert_begin_, expert_end_;
  int64_t num_tokens_ = 0, hidden_ = 0, num_assignments_ = 0;
  std::vector<int64_t> assignment_of_row_;  // host [N]: a = t * k + j of each row
  Tensor token_index_;                      // i32 [N]: the token t of each row
  Tensor row_index_;                        // i32 [N]: 0..N-1
  Tensor weights_;                          // f32 [N]: w_t,e of each row
  Tensor expert_out_;
};

}  // namespace moe::model

#endif  // MOE_MODEL_TOKEN_DISPATCHER_H_
