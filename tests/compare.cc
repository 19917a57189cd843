#include "tests/compare.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace moe::testing {

double AbsDiff(double a, double b) {
  if (!std::isfinite(a) || !std::isfinite(b)) return std::numeric_limits<double>::infinity();
  return std::fabs(a - b);
}

bool ScalarClose(double got, double want, double rtol, double atol) {
  return Within(AbsDiff(got, want), atol + rtol * std::fabs(want));
}

namespace {

template <typename W>
Closeness CompareImpl(absl::Span<const float> got, absl::Span<const W> want, const Tolerance& tol,
                      const std::string& what) {
  Closeness c;
  std::ostringstream msg;
  msg << what << ": ";
  if (got.size() != want.size()) {
    c.ok = false;
    msg << "size " << got.size() << " != expected " << want.size();
    c.message = msg.str();
    return c;
  }
  for (W w : want)
    if (std::isfinite(static_cast<double>(w))) c.scale = std::max(c.scale, std::fabs(static_cast<double>(w)));
  struct Bad {
    double ratio;
    size_t i;
  };
  std::vector<Bad> bad;
  bool have_worst = false;
  for (size_t i = 0; i < got.size(); ++i) {
    const double w = static_cast<double>(want[i]);
    const double err = AbsDiff(got[i], w);
    const double t = tol.atol + tol.rtol * std::fabs(w) + tol.scale_rtol * c.scale;
    const bool finite = std::isfinite(err);
    const double ratio = finite ? (t > 0 ? err / t : (err > 0 ? std::numeric_limits<double>::infinity() : 0))
                                : std::numeric_limits<double>::infinity();
    if (!finite) ++c.num_nonfinite;
    if (!Within(err, t)) bad.push_back({ratio, i});
    // The first non-finite element stays the worst; otherwise the largest ratio.
    if (!have_worst || (std::isfinite(c.worst_ratio) && !(ratio <= c.worst_ratio))) {
      c.worst = i;
      c.worst_error = err;
      c.worst_ratio = ratio;
      have_worst = true;
    }
  }
  c.num_bad = bad.size();
  c.ok = bad.empty();
  // Ratios are never NaN here (non-finite ones are +inf), so the sort is well defined.
  std::stable_sort(bad.begin(), bad.end(), [](const Bad& a, const Bad& b) { return a.ratio > b.ratio; });
  msg << c.num_bad << " of " << got.size() << " elements not close (" << c.num_nonfinite
      << " non-finite); worst |got - want| = " << c.worst_error << " at [" << c.worst << "], "
      << c.worst_ratio << " of its tolerance (rtol " << tol.rtol << ", scale_rtol " << tol.scale_rtol
      << " x scale " << c.scale << ", atol " << tol.atol << ")";
  for (size_t k = 0; k < std::min<size_t>(bad.size(), 5); ++k)
    msg << "\n  [" << bad[k].i << "] got " << got[bad[k].i] << " want "
        << static_cast<double>(want[bad[k].i]);
  c.message = msg.str();
  return c;
}

}  // namespace

Closeness Compare(absl::Span<const float> got, absl::Span<const double> want, const Tolerance& tol,
                  const std::string& what) {
  return CompareImpl(got, want, tol, what);
}

Closeness Compare(absl::Span<const float> got, absl::Span<const float> want, const Tolerance& tol,
                  const std::string& what) {
  return CompareImpl(got, want, tol, what);
}

}  // namespace moe::testing
