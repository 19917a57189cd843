#include "runtime/core/logging.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace moe {
namespace {

std::atomic<int> g_rank{-1};
std::atomic<int> g_world{0};

LogLevel LevelFromEnv() {
  const char* env = std::getenv("MOE_LOG_LEVEL");
  if (env == nullptr) return LogLevel::kInfo;
  if (std::strcmp(env, "DEBUG") == 0) return LogLevel::kDebug;
  if (std::strcmp(env, "WARNING") == 0) return LogLevel::kWarning;
  if (std::strcmp(env, "ERROR") == 0) return LogLevel::kError;
  return LogLevel::kInfo;
}

std::atomic<int> g_level{static_cast<int>(LevelFromEnv())};

char LevelChar(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return 'D';
    case LogLevel::kInfo: return 'I';
    case LogLevel::kWarning: return 'W';
    case LogLevel::kError: return 'E';
  }
  return '?';
}

}  // namespace

void SetLogRank(int rank, int world_size) {
  g_rank = rank;
  g_world = world_size;
}
int LogRank() { return g_rank; }
int LogWorldSize() { return g_world; }
void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }
bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level; }

LogMessage::LogMessage(LogLevel level, const char* file, int line) : level_(level) {
  if (g_rank >= 0) stream_ << "[rank " << g_rank << "/" << g_world << "] ";
  stream_ << LevelChar(level) << " ";
  if (level == LogLevel::kDebug || level == LogLevel::kError) {
    const char* base = std::strrchr(file, '/');
    stream_ << (base ? base + 1 : file) << ":" << line << " ";
  }
}

LogMessage::~LogMessage() {
  std::string text = stream_.str();
  text.push_back('\n');
  // One write per line keeps lines of concurrent ranks whole.
  ssize_t unused = ::write(STDERR_FILENO, text.data(), text.size());
  (void)unused;
}

}  // namespace moe
