#include "optim/lr_schedule.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "runtime/core/config.pb.h"

namespace moe::optim {

absl::StatusOr<LrDecay> ParseLrDecay(absl::string_view name) {
  if (name == "cosine") return LrDecay::kCosine;
  if (name == "linear") return LrDecay::kLinear;
  if (name == "constant") return LrDecay::kConstant;
  return absl::InvalidArgumentError(
      absl::StrCat("optim.lr_schedule = \"", name, "\" must be \"cosine\", \"linear\" or \"constant\""));
}

const char* LrDecayName(LrDecay d) {
  switch (d) {
    case LrDecay::kCosine:
      return "cosine";
    case LrDecay::kLinear:
      return "linear";
    case LrDecay::kConstant:
      return "constant";
  }
  return "?";
}

absl::StatusOr<LrSchedule> LrSchedule::Create(double max_lr, double min_lr, int64_t warmup_steps,
                                              int64_t decay_steps, LrDecay decay) {
  if (!(max_lr > 0))
    return absl::InvalidArgumentError(absl::StrCat("optim.lr = ", max_lr, " must be positive"));
  if (!(min_lr >= 0 && min_lr <= max_lr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("optim.min_lr = ", min_lr, " must be in [0, optim.lr = ", max_lr, "]"));
  }
  if (warmup_steps < 0) {
    return absl::InvalidArgumentError(absl::StrCat("optim.warmup_steps = ", warmup_steps, " must be >= 0"));
  }
  if (decay != LrDecay::kConstant && decay_steps <= warmup_steps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optim.decay_steps = ", decay_steps, " must exceed optim.warmup_steps = ", warmup_steps, " for the ",
        LrDecayName(decay), " schedule; raise optim.decay_steps (default train.steps) or lower the warmup"));
  }
  LrSchedule s;
  s.max_lr_ = max_lr;
  s.min_lr_ = min_lr;
  s.warmup_steps_ = warmup_steps;
  s.decay_steps_ = decay_steps;
  s.decay_ = decay;
  return s;
}

absl::StatusOr<LrSchedule> LrSchedule::FromConfig(const config::OptimConfig& config) {
  LrDecay decay = LrDecay::kCosine;
  if (config.has_lr_schedule()) {
    auto parsed = ParseLrDecay(config.lr_schedule());
    if (!parsed.ok()) return parsed.status();
    decay = *parsed;
  }
  return Create(config.lr(), config.min_lr(), config.warmup_steps(), config.decay_steps(), decay);
}

double LrSchedule::At(int64_t step) const {
  if (warmup_steps_ > 0 && step <= warmup_steps_) {
    if (step <= 0) return 0.0;
    return max_lr_ * static_cast<double>(step) / static_cast<double>(warmup_steps_);
  }
  if (decay_ == LrDecay::kConstant) return max_lr_;
  if (step > decay_steps_) return min_lr_;
  const double ratio =
      static_cast<double>(step - warmup_steps_) / static_cast<double>(decay_steps_ - warmup_steps_);
  double coeff = 1.0;
  if (decay_ == LrDecay::kLinear) {
    coeff = 1.0 - ratio;
  } else {
    coeff = 0.5 * (std::cos(M_PI * ratio) + 1.0);
  }
  return min_lr_ + coeff * (max_lr_ - min_lr_);
}

std::string LrSchedule::ToString() const {
  if (decay_ == LrDecay::kConstant) {
    return absl::StrCat("constant lr ", max_lr_, ", warmup ", warmup_steps_);
  }
  return absl::StrCat(LrDecayName(decay_), " lr ", max_lr_, " -> ", min_lr_, ", warmup ", warmup_steps_,
                      ", decay to step ", decay_steps_);
}

}  // namespace moe::optim
