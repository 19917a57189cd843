// Rank-aware logging: every line reads "[rank 3/8] I message".
//
//   MOE_LOG(INFO) << "step " << step;        // every rank
//   MOE_LOG_RANK0(INFO) << "resolved config"; // rank 0 only
//
// The rank is unknown until the communication layer starts; comm/ calls
// SetLogRank() once MPI is up. Levels below MOE_LOG_LEVEL (env: DEBUG, INFO,
// WARNING, ERROR; default INFO) are dropped. Lines go to stderr, each written
// with one call so lines of different ranks do not interleave mid-line.
#ifndef MOE_RUNTIME_CORE_LOGGING_H_
#define MOE_RUNTIME_CORE_LOGGING_H_

#include <sstream>

namespace moe {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogRank(int rank, int world_size);
int LogRank();       // -1 before SetLogRank
int LogWorldSize();  // 0 before SetLogRank
void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

// Swallows the stream when a log line is disabled.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

}  // namespace moe

#define MOE_LOG_LEVEL_DEBUG ::moe::LogLevel::kDebug
#define MOE_LOG_LEVEL_INFO ::moe::LogLevel::kInfo
#define MOE_LOG_LEVEL_WARNING ::moe::LogLevel::kWarning
#define MOE_LOG_LEVEL_ERROR ::moe::LogLevel::kError

#define MOE_LOG_IF_(level, cond)                                   \
  !((cond) && ::moe::LogEnabled(MOE_LOG_LEVEL_##level))            \
      ? (void)0                                                    \
      : ::moe::LogVoidify() &                                      \
            ::moe::LogMessage(MOE_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#define MOE_LOG(level) MOE_LOG_IF_(level, true)
#define MOE_LOG_RANK0(level) MOE_LOG_IF_(level, ::moe::LogRank() <= 0)

#endif  // MOE_RUNTIME_CORE_LOGGING_H_
