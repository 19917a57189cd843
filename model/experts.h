// Experts: the E_local SwiGLU experts of a MoE layer on tokens grouped by
// expert (TokenDispatcher's ExpertInput).
//
// Parameters (global shapes, docs/model.md): model.layers.{l}.mlp.experts.gate_proj
// [E, Fe, d], up_proj [E, Fe, d], down_proj [E, d, Fe]; this rank holds the
// experts [expert_begin, expert_end) (dim 0), so locally [E_local, ., .].
// With expert tensor parallelism (ShardPlan::expert_tp) TP rank r holds the
// ffn slice [Fe r / tp, Fe (r + 1) / tp) of each (gate/up dim 1, down dim 2):
// locally [E_local, Fe / tp, d] and [E_local, d, Fe / tp], and Forward's
// output (Backward's dx) is then this slice's partial sum, which the caller
// sums over the TP group (MoELayer, LlepRunner).
//
//   SequentialExperts  a plain loop of per-expert GEMMs (the reference)
//   GroupedExperts     one grouped GEMM per projection over all local experts
//                      (the fast path); equal to the sequential one to 1e-6.
#ifndef MOE_MODEL_EXPERTS_H_
#define MOE_MODEL_EXPERTS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/common.h"

namespace moe::model {

class Experts {
 public:
  virtual ~Experts() = default;

  // `prefix` is "model.layers.{l}.mlp.experts."; down_std = init_std / sqrt(2 L).
  // ffn_tp_size > 1 (expert TP): this rank holds ffn slice ffn_tp_rank of
  // ffn_tp_size of each expert.
  absl::Status Init(Stream& stream, const std::string& prefix, int64_t hidden_size,
                    int64_t expert_ffn_hidden_size, int64_t num_experts, int64_t expert_begin,
                    int64_t expert_end, float init_std, float down_std, uint64_t seed, int ffn_tp_size = 1,
                    int ffn_tp_rank = 0);

  // x [N, d], rows of local expert i at [offsets[i], offsets[i + 1]) (E_local + 1
  // host offsets) -> y [N, d]. Keeps x and the [N, Fe] intermediates.
  virtual absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x,
                                         absl::Span<const int64_t> offsets) = 0;
  // Accumulates the three weight grads; returns dx [N, d].
  virtual absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dy) = 0;

  // What Forward keeps for Backward. With overlapped chunks several forwards
  // are pending: take the state after each Forward and restore it before the
  // matching Backward.
  struct Saved {
    Tensor x, g, u, act;
    std::vector<int64_t> offsets;
  };
  Saved TakeSaved();
  void RestoreSaved(Saved saved);

  int64_t expert_begin() const { return expert_begin_; }
  int64_t expert_end() const { return expert_end_; }
  int64_t num_local_experts() const { return expert_end_ - expert_begin_; }
  // The ffn columns held here (Fe, or Fe / tp under expert TP).
  int64_t local_ffn() const { return ffn_; }
  parallel::Parameter& gate_proj() { return gate_; }
  parallel::Parameter& up_proj() { return up_; }
  parallel::Parameter& down_proj() { return down_; }

 protected:
  absl::Status CheckInput(const Tensor& x, absl::Span<const int64_t> offsets) const;
  // Allocates and keeps x, offsets, gate/up/act [N, Fe].
  absl::Status Keep(Stream& stream, const Tensor& x, absl::Span<const int64_t> offsets);
  void Release();

  parallel::Parameter gate_, up_, down_;
  int64_t expert_begin_ = 0, expert_end_ = 0, ffn_ = 0;
  Tensor x_, g_, u_, act_;
  std::vector<int64_t> offsets_;
};

class SequentialExperts : public Experts {
 public:
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x, absl::Span<const int64_t> offsets) override;
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dy) override;
};

class GroupedExperts : public Experts {
 public:
  absl::StatusOr<Tensor> Forward(Stream& stream, const Tensor& x, absl::Span<const int64_t> offsets) override;
  absl::StatusOr<Tensor> Backward(Stream& stream, const Tensor& dy) override;
};

// Expert tensor parallelism: rows [N, d] holding this TP rank's partial sum
// (an ffn slice's output, or its input gradient) -> the full sum, in place,
// over `expert_tp` (collective over it). Null: nothing to do.
absl::Status SumExpertPartials(comm::Communicator* expert_tp, Stream& stream, const Tensor& rows);

// "grouped" (also "") or "sequential" (model.moe.experts_impl).
absl::StatusOr<std::unique_ptr<Experts>> MakeExperts(const std::string& impl);

}  // namespace moe::model

#endif  // MOE_MODEL_EXPERTS_H_
