// The closeness checks of tests/compare.h (behind ExpectClose, the reference
// test's CompareTensor and the layout/LLEP comparisons) must fail on NaN and
// Inf on either side, in every tolerance mode, and name the bad element.
#include "tests/compare.h"

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace moe::testing {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

TEST_CASE("Within and AbsDiff are false / infinite on non-finite values") {
  CHECK(Within(1e-9, 1e-6));
  CHECK_FALSE(Within(kNaN, 1e-6));
  CHECK_FALSE(Within(1e-9, kNaN));
  CHECK_FALSE(Within(kInf, 1e300));
  CHECK(AbsDiff(1.0, 1.5) == 0.5);
  for (double bad : {kNaN, kInf, -kInf}) {
    INFO("value " << bad);
    CHECK(std::isinf(AbsDiff(bad, 1.0)));
    CHECK(std::isinf(AbsDiff(1.0, bad)));
    CHECK(std::isinf(AbsDiff(bad, bad)));  // Inf == Inf is not close
    CHECK_FALSE(ScalarClose(bad, 1.0, 1e-3, 1e-3));
    CHECK_FALSE(ScalarClose(1.0, bad, 1e-3, 1e-3));
    CHECK_FALSE(ScalarClose(bad, bad, 1e-3, 1e-3));
  }
  CHECK(ScalarClose(1.0, 1.0 + 1e-7, 1e-6, 0));
  CHECK_FALSE(ScalarClose(1.0, 1.1, 1e-6, 0));
}

TEST_CASE("Compare fails on NaN and Inf in got or want, in every tolerance mode") {
  const std::vector<Tolerance> modes = {{.rtol = 1e-5, .atol = 1e-6},
                                        {.scale_rtol = 1e-5},
                                        {.atol = 1e-5},
                                        {.rtol = 1, .scale_rtol = 1, .atol = 1e30}};
  const std::vector<double> want = {1.0, -2.0, 3.0, 0.5};
  const std::vector<float> same = {1.0f, -2.0f, 3.0f, 0.5f};
  for (const Tolerance& tol : modes) {
    CHECK(Compare(same, want, tol, "same").ok);
    for (double bad : {kNaN, kInf, -kInf}) {
      for (size_t at = 0; at < want.size(); ++at) {
        INFO("bad value " << bad << " at " << at << ", tolerance rtol " << tol.rtol << " scale_rtol "
                          << tol.scale_rtol << " atol " << tol.atol);
        std::vector<float> got = same;
        got[at] = static_cast<float>(bad);
        Closeness c = Compare(got, want, tol, "got");
        CHECK_FALSE(c.ok);
        CHECK(c.num_bad == 1);
        CHECK(c.num_nonfinite == 1);
        CHECK(c.worst == at);
        CHECK(c.message.find("[" + std::to_string(at) + "]") != std::string::npos);

        std::vector<double> w = want;
        w[at] = bad;
        c = Compare(same, w, tol, "want");
        CHECK_FALSE(c.ok);
        CHECK(c.worst == at);
        // Both sides non-finite (even the same Inf) is not close either.
        c = Compare(got, w, tol, "both");
        CHECK_FALSE(c.ok);
        // The float-against-float overload too.
        std::vector<float> wf(w.begin(), w.end());
        CHECK_FALSE(Compare(same, wf, tol, "float want").ok);
        CHECK_FALSE(Compare(got, same, tol, "float got").ok);
      }
    }
  }
  // A NaN everywhere is not close, and neither is a size mismatch.
  const std::vector<float> all_nan(4, std::nanf(""));
  CHECK_FALSE(Compare(all_nan, want, {.scale_rtol = 1e-5}, "all NaN").ok);
  CHECK_FALSE(Compare(std::vector<float>{1.0f}, want, {.atol = 1}, "size").ok);
}

TEST_CASE("Compare applies each tolerance and reports the worst element") {
  const std::vector<double> want = {100.0, 1.0};
  // 1e-3 off at element 1: within 1e-5 of the scale (100) -> 1e-3, not within rtol of |want| = 1.
  const std::vector<float> got = {100.0f, 1.001f};
  CHECK(Compare(got, want, {.scale_rtol = 1.1e-5}, "scale").ok);
  const Closeness c = Compare(got, want, {.rtol = 1e-5}, "elementwise");
  CHECK_FALSE(c.ok);
  CHECK(c.worst == 1);
  CHECK(c.num_bad == 1);
  CHECK(c.scale == 100.0);
}

}  // namespace
}  // namespace moe::testing
