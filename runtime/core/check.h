// MOE_CHECK: programmer invariants only (never user input, which gets a Status).
// The Debian 12 Abseil (20220623) has no ABSL_CHECK, so it is defined here.
//
//   MOE_CHECK(offset <= size) << "slice " << begin << ".." << end;
//
// On failure it prints "file:line: check failed: <cond> <message>" and aborts.
#ifndef MOE_RUNTIME_CORE_CHECK_H_
#define MOE_RUNTIME_CORE_CHECK_H_

#include <sstream>

namespace moe {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition);
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

struct CheckVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace moe

#define MOE_CHECK(cond) \
  (cond) ? (void)0 : ::moe::CheckVoidify() & ::moe::CheckFailure(__FILE__, __LINE__, #cond).stream()

#endif  // MOE_RUNTIME_CORE_CHECK_H_
