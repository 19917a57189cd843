// Learning-rate schedule: linear warmup, then cosine, linear or constant decay
// to min_lr (Megatron-LM's OptimizerParamScheduler.get_lr).
//
// Steps are counted from 1: At(s) is the rate of the s-th optimizer
// step (the trainer passes optimizer.step() + 1 before calling Step). With
// W = warmup_steps, D = decay_steps, lr = max_lr, m = min_lr:
//
//   s <= W (W > 0):      lr * s / W                       (reaches lr at s = W)
//   constant, s > W:     lr
//   s > D:               m
//   W < s <= D:          r = (s - W) / (D - W)
//                        linear: m + (lr - m) * (1 - r)
//                        cosine: m + (lr - m) * 0.5 * (1 + cos(pi * r))
//
// That is Megatron's formula evaluated at num_steps = s (Megatron evaluates it
// after incrementing its step counter, which starts at 0; counting from 1 here
// avoids a first update with lr = 0 during warmup). At(s) for s <= 0 is 0 with
// warmup and max_lr without (never used by the trainer).
//
// Worked example: lr 1e-3, min_lr 1e-4, W 10, D 110, cosine:
//   At(1) = 1e-4, At(10) = 1e-3, At(60) = 5.5e-4, At(110) = 1e-4, At(500) = 1e-4.
#ifndef MOE_OPTIM_LR_SCHEDULE_H_
#define MOE_OPTIM_LR_SCHEDULE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::config {
class OptimConfig;
}

namespace moe::optim {

enum class LrDecay : uint8_t { kCosine = 0, kLinear = 1, kConstant = 2 };

// "cosine", "linear", "constant" <-> LrDecay; an unknown name is InvalidArgument
// naming optim.lr_schedule.
absl::StatusOr<LrDecay> ParseLrDecay(absl::string_view name);
const char* LrDecayName(LrDecay d);

class LrSchedule {
 public:
  // Errors (naming the optim.* field): max_lr <= 0, min_lr outside [0, max_lr],
  // warmup_steps < 0, and for linear/cosine decay_steps <= warmup_steps.
  static absl::StatusOr<LrSchedule> Create(double max_lr, double min_lr, int64_t warmup_steps,
                                           int64_t decay_steps, LrDecay decay);
  // From optim.lr, min_lr, warmup_steps, decay_steps, lr_schedule (after
  // ApplyDefaults, which sets decay_steps to train.steps when unset).
  static absl::StatusOr<LrSchedule> FromConfig(const config::OptimConfig& config);

  // The learning rate of optimizer step `step` (1-based; see above).
  double At(int64_t step) const;

  double max_lr() const { return max_lr_; }
  double min_lr() const { return min_lr_; }
  int64_t warmup_steps() const { return warmup_steps_; }
  int64_t decay_steps() const { return decay_steps_; }
  LrDecay decay() const { return decay_; }
  std::string ToString() const;  // "cosine lr 0.001 -> 0.0001, warmup 10, decay to step 110"

 private:
  LrSchedule() = default;
  double max_lr_ = 0, min_lr_ = 0;
  int64_t warmup_steps_ = 0, decay_steps_ = 0;
  LrDecay decay_ = LrDecay::kCosine;
};

}  // namespace moe::optim

#endif  // MOE_OPTIM_LR_SCHEDULE_H_
