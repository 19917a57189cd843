// Closeness checks shared by every test. Each is written as "within
// tolerance" (err <= tol), never as "not beyond tolerance" (err > tol is
// false for NaN), and a non-finite value on either side is never close: a
// NaN or Inf anywhere makes the comparison fail with its index printed.
// tests/core/compare_test.cc feeds NaN and Inf to every helper to prove it.
#ifndef MOE_TESTS_COMPARE_H_
#define MOE_TESTS_COMPARE_H_

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "absl/types/span.h"

namespace moe::testing {

// Per element: |got - want| <= atol + rtol * |want| + scale_rtol * max_i |want_i|.
struct Tolerance {
  double rtol = 0;        // of the element's own |want|
  double scale_rtol = 0;  // of the largest |want| in the tensor
  double atol = 0;
};

struct Closeness {
  bool ok = true;      // sizes match, every element finite and within tolerance
  size_t num_bad = 0;  // elements out of tolerance or non-finite
  size_t num_nonfinite = 0;
  size_t worst = 0;        // index of the worst element (the first non-finite one, if any)
  double worst_error = 0;  // |got - want| there; +inf when non-finite
  double worst_ratio = 0;  // worst_error / its tolerance; +inf when non-finite
  double scale = 0;        // max |want| over the finite elements
  std::string message;     // "<what>: ..." with the worst elements
};

// True when err is finite and err <= tol: false when either is NaN and when
// err is infinite (even against an infinite tolerance).
inline bool Within(double err, double tol) { return std::isfinite(err) && err <= tol; }

// |a - b|, or +inf when either is not finite (so Inf == Inf is not close).
double AbsDiff(double a, double b);

// True when |got - want| <= atol + rtol * |want| and both are finite.
bool ScalarClose(double got, double want, double rtol, double atol);

Closeness Compare(absl::Span<const float> got, absl::Span<const double> want, const Tolerance& tol,
                  const std::string& what);
Closeness Compare(absl::Span<const float> got, absl::Span<const float> want, const Tolerance& tol,
                  const std::string& what);

}  // namespace moe::testing

#endif  // MOE_TESTS_COMPARE_H_
