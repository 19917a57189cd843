// Helpers shared by the model tests: configs, host access to CPU tensors, and
// a finite-difference gradient checker that skips the rare elements whose
// perturbation changes a routing decision (top-k or capacity), where the loss
// is not differentiable.
#ifndef MOE_TESTS_MODEL_MODEL_TEST_UTIL_H_
#define MOE_TESTS_MODEL_MODEL_TEST_UTIL_H_

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "model/common.h"
#include "runtime/core/config.h"
#include "runtime/core/tensor.h"

namespace moe::model::testing {

Stream& CpuStream();

// A resolved ModelConfig (ApplyDefaults) from a text-format "model { ... }" body.
config::ModelConfig TinyConfig(const std::string& model_text);

std::vector<float> ToVec(const Tensor& t);                   // CPU tensor -> host copy
void FromVec(const Tensor& t, const std::vector<float>& v);  // host -> CPU tensor
Tensor NewTensor(Shape shape, const std::vector<float>& values);
Tensor RandomTensor(Shape shape, std::mt19937& rng, float std = 1.0f);
double Dot(const Tensor& a, const std::vector<float>& b);

// One tensor to check: `value` is perturbed in place, `grad` holds the analytic
// gradient (read after `backward` ran once).
struct GradTarget {
  std::string name;
  Tensor value;
  Tensor grad;
};

struct FdOptions {
  double step = 1e-2;       // perturbation (the actual float delta is used)
  int max_per_tensor = 16;  // random elements per tensor
  double rel_tol = 3e-2;    // of |analytic|
  double abs_tol = 2e-3;    // of the tensor's largest |analytic| (plus a floor)
  double floor = 1e-4;
  uint32_t seed = 7;
};

struct GradCheckResult {
  int checked = 0;
  int skipped = 0;     // perturbation changed routing
  int bad = 0;         // out of tolerance, or a non-finite loss or gradient
  std::string report;  // counts, the worst element and up to 10 bad ones
  bool ok() const { return bad == 0 && checked > 0 && skipped <= checked / 4; }
};

// Central differences of loss() against the gradients. loss() must rerun the
// forward from the current values; routing_key() (may be empty) returns a
// fingerprint of all routing decisions: an element whose +/- perturbation
// changes it is skipped (counted). A NaN or Inf loss, difference or gradient
// counts as a mismatch.
GradCheckResult RunGradientCheck(const std::vector<GradTarget>& targets, const std::function<double()>& loss,
                                 const std::function<std::string()>& routing_key, const FdOptions& opt = {});

// RunGradientCheck, failing the Catch2 test (with its report) unless ok();
// returns the number of checked elements.
int CheckGradients(const std::vector<GradTarget>& targets, const std::function<double()>& loss,
                   const std::function<std::string()>& routing_key, const FdOptions& opt = {});

}  // namespace moe::model::testing

#endif  // MOE_TESTS_MODEL_MODEL_TEST_UTIL_H_
