#include "tests/model/model_test_util.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "runtime/core/backend.h"
#include "runtime/core/config.h"
#include "tests/compare.h"

namespace moe::model::testing {

Stream& CpuStream() {
  auto backend = GetBackend(Device::Cpu());
  REQUIRE(backend.ok());
  return (*backend)->default_stream();
}

config::ModelConfig TinyConfig(const std::string& model_text) {
  auto job = ParseConfigText("model { " + model_text + " }", "test");
  INFO(job.status().ToString());
  REQUIRE(job.ok());
  ApplyDefaults(1, &*job);
  return job->model();
}

std::vector<float> ToVec(const Tensor& t) {
  REQUIRE(CpuStream().Synchronize().ok());
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

void FromVec(const Tensor& t, const std::vector<float>& v) {
  REQUIRE(static_cast<int64_t>(v.size()) == t.numel());
  if (!v.empty())
    std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));  // memcpy(_, nullptr, 0) is UB
}

Tensor NewTensor(Shape shape, const std::vector<float>& values) {
  auto backend = GetBackend(Device::Cpu());
  REQUIRE(backend.ok());
  auto t = Tensor::Empty(**backend, shape, DType::kF32, MemoryCategory::kOther);
  REQUIRE(t.ok());
  FromVec(*t, values);
  return *t;
}

Tensor RandomTensor(Shape shape, std::mt19937& rng, float std) {
  std::normal_distribution<float> n(0.0f, std);
  std::vector<float> v(shape.numel());
  for (float& x : v) x = n(rng);
  return NewTensor(shape, v);
}

double Dot(const Tensor& a, const std::vector<float>& b) {
  std::vector<float> av = ToVec(a);
  REQUIRE(av.size() == b.size());
  double s = 0;
  for (size_t i = 0; i < av.size(); ++i) s += static_cast<double>(av[i]) * b[i];
  return s;
}

GradCheckResult RunGradientCheck(const std::vector<GradTarget>& targets, const std::function<double()>& loss,
                                 const std::function<std::string()>& routing_key, const FdOptions& opt) {
  std::mt19937 rng(opt.seed);
  const std::string base_key = routing_key ? routing_key() : "";
  int checked = 0, skipped = 0;
  struct Bad {
    double excess;
    std::string text;
  };
  std::vector<Bad> bad;
  double worst_ratio = 0;
  std::string worst_text;
  for (const GradTarget& target : targets) {
    const std::vector<float> grad = ToVec(target.grad);
    float* x = target.value.data<float>();
    const int64_t n = target.value.numel();
    double gmax = 0;
    for (float g : grad) gmax = std::max(gmax, static_cast<double>(std::fabs(g)));
    std::vector<int64_t> idx(n);
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.resize(std::min<int64_t>(n, opt.max_per_tensor));
    for (int64_t i : idx) {
      const float old = x[i];
      const float xp = old + static_cast<float>(opt.step);
      const float xm = old - static_cast<float>(opt.step);
      x[i] = xp;
      const double lp = loss();
      const std::string kp = routing_key ? routing_key() : "";
      x[i] = xm;
      const double lm = loss();
      const std::string km = routing_key ? routing_key() : "";
      x[i] = old;
      if (kp != base_key || km != base_key) {
        ++skipped;
        continue;
      }
      const double fd = (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
      const double g = grad[i];
      const double tol = opt.rel_tol * std::fabs(g) + opt.abs_tol * gmax + opt.floor;
      const double err = moe::testing::AbsDiff(fd, g);  // +inf when either is not finite
      std::ostringstream text;
      text << target.name << "[" << i << "]: analytic " << g << " finite-difference " << fd << " |diff| "
           << err << " tol " << tol;
      const double ratio = std::isfinite(err / tol) ? err / tol : HUGE_VAL;  // never NaN
      if (ratio > worst_ratio || worst_text.empty()) {
        worst_ratio = ratio;
        worst_text = text.str();
      }
      if (!moe::testing::Within(err, tol)) bad.push_back({ratio, text.str()});
      ++checked;
    }
  }
  loss();  // leave the layers' forward state at the unperturbed values
  std::stable_sort(bad.begin(), bad.end(), [](const Bad& a, const Bad& b) { return a.excess > b.excess; });
  std::ostringstream report;
  report << checked << " elements checked, " << skipped << " skipped (perturbation changed routing), "
         << bad.size() << " bad; worst: " << worst_text;
  for (size_t i = 0; i < std::min<size_t>(bad.size(), 10); ++i) report << "\n  BAD " << bad[i].text;
  GradCheckResult result;
  result.checked = checked;
  result.skipped = skipped;
  result.bad = static_cast<int>(bad.size());
  result.report = report.str();
  return result;
}

int CheckGradients(const std::vector<GradTarget>& targets, const std::function<double()>& loss,
                   const std::function<std::string()>& routing_key, const FdOptions& opt) {
  const GradCheckResult r = RunGradientCheck(targets, loss, routing_key, opt);
  INFO(r.report);
  CHECK(r.bad == 0);
  CHECK(r.skipped <= r.checked / 4);
  CHECK(r.checked > 0);
  return r.checked;
}

}  // namespace moe::model::testing
