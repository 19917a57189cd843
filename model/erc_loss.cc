#include "model/erc_loss.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "parallel/tensor_parallel.h"
#include "runtime/core/ops.h"
#include "runtime/core/rng.h"
#include "runtime/core/status.h"

namespace moe::model {

void ErcLoss::Init(const std::string& prefix, const config::MoeConfig& moe, uint64_t seed,
                   const ShardPlan& plan) {
  noise_name_ = prefix + "router.erc_noise";
  coeff_ = moe.erc_loss_coeff();
  alpha_ = moe.erc_alpha();
  seed_ = seed;
  ep_size_ = plan.ep_size;
  tp_size_ = plan.tp_size;
  expert_tp_ = ExpertTpGroup(plan);
}

void ErcLoss::DrawNoise(absl::Span<const float> r, int64_t E, int64_t d) {
  std::vector<double> norm(E);
  for (int64_t i = 0; i < E; ++i) {
    double s = 0;
    for (int64_t c = 0; c < d; ++c) s += static_cast<double>(r[i * d + c]) * r[i * d + c];
    norm[i] = std::sqrt(s);
  }
  const PhiloxKey key = PhiloxKeyFromName(noise_name_);
  constexpr double kInv32 = 1.0 / 4294967296.0;
  delta_.assign(E * d, 1.0);
  for (int64_t i = 0; i < E; ++i) {
    double nearest = INFINITY;
    for (int64_t j = 0; j < E; ++j) {
      if (j == i) continue;
      double s = 0;
      for (int64_t c = 0; c < d; ++c) {
        const double diff = static_cast<double>(r[i * d + c]) - r[j * d + c];
        s += diff * diff;
      }
      nearest = std::min(nearest, std::sqrt(s));
    }
    const double eps = norm[i] > 0 ? nearest / (2.0 * norm[i]) : 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const uint64_t index = static_cast<uint64_t>(i * d + c);
      const PhiloxCounter out =
          Philox4x32_10({static_cast<uint32_t>(index), static_cast<uint32_t>(step_),
                         static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32)},
                        key);
      const double u = (static_cast<double>(out[0]) + 0.5) * kInv32;
      delta_[i * d + c] = 1.0 + eps * (2.0 * u - 1.0);
    }
  }
  noise_step_ = step_;
}

absl::StatusOr<double> ErcLoss::Forward(Stream& stream, const Tensor& router_w, const Tensor& gate_w,
                                        int64_t expert_begin, comm::Communicator* ep,
                                        absl::Span<const float> router_values) {
  const int64_t E = router_w.size(0), d = router_w.size(1);
  if (gate_w.rank() != 3 || gate_w.size(2) != d || expert_begin < 0 || expert_begin + gate_w.size(0) > E) {
    return absl::InvalidArgumentError(absl::StrCat("ErcLoss::Forward: router ", router_w.ToString(),
                                                   " and gate_proj ", gate_w.ToString(), " from expert ",
                                                   expert_begin, " do not match"));
  }
  num_experts_ = E;
  hidden_ = d;
  local_ = gate_w.size(0);
  ffn_ = gate_w.size(1);
  expert_begin_ = expert_begin;
  if ((ep == nullptr ? 1 : ep->size()) * local_ != E) {
    return absl::InvalidArgumentError(absl::StrCat("ErcLoss::Forward: ", local_, " local experts of ", E,
                                                   " need an EP group of ", E / std::max<int64_t>(local_, 1),
                                                   " ranks"));
  }
  // Proxies on the host (E x d is small). The noise (eps_i from the rows'
  // distances, u from Philox) is drawn at the first Forward of a step and kept
  // for the step's other micro-batches: a constant of the step.
  std::vector<float> read_here;
  if (router_values.empty()) {
    ASSIGN_OR_RETURN(read_here, ToHostFloats(stream, router_w));
  } else if (static_cast<int64_t>(router_values.size()) != E * d) {
    return absl::InvalidArgumentError(
        absl::StrCat("ErcLoss::Forward: ", router_values.size(), " router values for ", router_w.ToString()));
  }
  const absl::Span<const float> r =
      router_values.empty() ? absl::Span<const float>(read_here) : router_values;
  if (noise_step_ != step_ || static_cast<int64_t>(delta_.size()) != E * d) DrawNoise(r, E, d);
  std::vector<float> proxies(E * d);
  for (int64_t i = 0; i < E * d; ++i) proxies[i] = static_cast<float>(r[i] * delta_[i]);
  ASSIGN_OR_RETURN(proxies_, FromHostFloats(stream, proxies, Shape{E, d}));
  // act [E, E_local * Fe] = P Wg_local^T: proxy i through every local expert's gate.
  const Tensor gate2d = gate_w.Reshape(Shape{local_ * ffn_, d});
  ASSIGN_OR_RETURN(act_, NewActivation(stream, Shape{E, local_ * ffn_}));
  RETURN_IF_ERROR(ops::Gemm(stream, proxies_, false, gate2d, true, act_));
  // The squared norm of each activation a_i,j (row i * E_local + j of act as
  // [E * E_local, Fe]; a dot accumulated in double, stored in f32), summed
  // over the expert TP group (each rank holds an ffn slice), gathered over
  // EP: all on the stream, then one host read of every rank's [E, E_local].
  if (!rows_.defined() || rows_.numel() != E * local_) {  // uploaded once: the shape is the layer's
    std::vector<int32_t> identity(E * local_);
    for (size_t r = 0; r < identity.size(); ++r) identity[r] = static_cast<int32_t>(r);
    ASSIGN_OR_RETURN(rows_, FromHostInts(stream, identity, Shape{E * local_}, MemoryCategory::kOther));
  }
  const Tensor act_rows = act_.Reshape(Shape{E * local_, ffn_});
  ASSIGN_OR_RETURN(Tensor squares, NewActivation(stream, Shape{1, E * local_}));
  RETURN_IF_ERROR(ops::GatherRowDot(stream, act_rows, rows_, act_rows, squares.Reshape(Shape{E * local_})));
  if (expert_tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*expert_tp_, stream, squares));
  const int P = ep != nullptr ? ep->size() : 1;
  if (P > 1) {
    ASSIGN_OR_RETURN(squares, parallel::AllGatherRows(*ep, stream, squares, P));
  }
  ASSIGN_OR_RETURN(const std::vector<float> all, ToHostFloats(stream, squares));  // [P, E, E_local]
  // M_i,e for expert e = p E_local + j of EP rank p.
  m_.assign(E * E, 0.0f);
  for (int p = 0; p < P; ++p)
    for (int64_t i = 0; i < E; ++i)
      for (int64_t j = 0; j < local_; ++j)
        m_[i * E + p * local_ + j] =
            static_cast<float>(std::sqrt(static_cast<double>(all[(p * E + i) * local_ + j])));
  double sum = 0;
  for (int64_t i = 0; i < E; ++i) {
    const double own = alpha_ * m_[i * E + i];
    for (int64_t j = 0; j < E; ++j) {
      if (j == i) continue;
      sum += std::max(0.0, m_[i * E + j] - own) + std::max(0.0, m_[j * E + i] - own);
    }
  }
  loss_ = coeff_ / static_cast<double>(E * E) * sum;
  return loss_;
}

absl::Status ErcLoss::Backward(Stream& stream, float scale, const Tensor& gate_w, const Tensor& router_grad,
                               const Tensor& gate_grad) {
  if (!proxies_.defined()) return absl::FailedPreconditionError("ErcLoss::Backward called without a Forward");
  const int64_t E = num_experts_, d = hidden_;
  // G = dL / dM (only the local columns are used below).
  const double c = coeff_ / static_cast<double>(E * E);
  std::vector<double> g(E * E, 0.0);
  for (int64_t i = 0; i < E; ++i) {
    const double own = alpha_ * m_[i * E + i];
    for (int64_t j = 0; j < E; ++j) {
      if (j == i) continue;
      if (m_[i * E + j] - own > 0) {  // expert j answers proxy i more than alpha x expert i does
        g[i * E + j] += c;
        g[i * E + i] -= c * alpha_;
      }
      if (m_[j * E + i] - own > 0) {  // proxy j excites expert i more than alpha x proxy i does
        g[j * E + i] += c;
        g[i * E + i] -= c * alpha_;
      }
    }
  }
  // dact = G_i,j act / M_i,j (d||a|| / da = a / ||a||; 0 when M = 0): each
  // activation scaled on the stream by its host-known factor (no host read).
  std::vector<float> factor(E * local_, 0.0f);
  for (int64_t i = 0; i < E; ++i) {
    for (int64_t j = 0; j < local_; ++j) {
      const int64_t col = expert_begin_ + j;
      const double m = m_[i * E + col], gij = g[i * E + col];
      if (gij != 0 && m > 0) factor[i * local_ + j] = static_cast<float>(gij / m);
    }
  }
  ASSIGN_OR_RETURN(Tensor factor_t, FromHostFloats(stream, factor, Shape{E * local_}));
  ASSIGN_OR_RETURN(Tensor dact_t, NewActivation(stream, Shape{E, local_ * ffn_}));
  RETURN_IF_ERROR(ops::GatherRows(stream, act_.Reshape(Shape{E * local_, ffn_}), rows_,
                                  dact_t.Reshape(Shape{E * local_, ffn_}), factor_t));
  const Tensor gate2d = gate_w.Reshape(Shape{local_ * ffn_, d});
  const Tensor dgate2d = gate_grad.Reshape(Shape{local_ * ffn_, d});
  // Expert grads are summed over EDP x TP when replicated over TP, over EDP only when sharded.
  const float expert_factor =
      static_cast<float>(ep_size_) / static_cast<float>(expert_tp_ != nullptr ? 1 : tp_size_);
  RETURN_IF_ERROR(ops::Gemm(stream, dact_t, true, proxies_, false, dgate2d, scale * expert_factor, 1.0f));
  // dP = dact Wg_local; dR = delta * dP (the noise and eps are constants).
  ASSIGN_OR_RETURN(Tensor dproxy, NewActivation(stream, Shape{E, d}));
  RETURN_IF_ERROR(ops::Gemm(stream, dact_t, false, gate2d, false, dproxy));
  if (expert_tp_ != nullptr) RETURN_IF_ERROR(parallel::AllReduceSum(*expert_tp_, stream, dproxy));
  // The noise factors are host values: uploaded and multiplied on the stream (no host read).
  const std::vector<float> delta(delta_.begin(), delta_.end());
  ASSIGN_OR_RETURN(Tensor delta_t, FromHostFloats(stream, delta, Shape{E, d}));
  RETURN_IF_ERROR(ops::Mul(stream, dproxy, delta_t, dproxy));
  RETURN_IF_ERROR(ops::Axpby(stream, scale * static_cast<float>(ep_size_), dproxy, 1.0f, router_grad));
  proxies_ = act_ = Tensor();
  return absl::OkStatus();
}

}  // namespace moe::model
