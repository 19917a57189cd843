// Spans for the profiler: named intervals of a stream's work (forward and
// backward phases per layer, grad sync, optimizer, ...) or of a host thread
// (data loading, checkpoint save).
//
// A Span is RAII. When a Recorder is active (trace::SetRecorder), a stream
// span is timed in stream order: its begin and end are host functions enqueued
// on the stream (Stream::LaunchHostFunc), which read the clock when the stream
// reaches them, so the times are those of the work, not of the host calls that
// enqueued it (on the CPU's inline stream the two coincide; on a worker or CUDA
// stream they differ). In CUDA builds every span is also an NVTX range in the
// "moe" domain (its name, colour and category by Kind, the layer as payload),
// recorder or not, so Nsight Systems shows the phases without profile.trace.
// With no active recorder a span costs one atomic load.
//
// Spans also label communicator ops: CurrentLabel() is the innermost span of
// the calling thread, which the communicator front end copies into each op it
// enqueues, so the profiler attributes every op to its layer and phase.
#ifndef MOE_RUNTIME_CORE_TRACE_H_
#define MOE_RUNTIME_CORE_TRACE_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "runtime/core/backend.h"

namespace moe::trace {

// What a span's time counts as in the step breakdown.
enum class Kind : uint8_t {
  kCompute = 0,  // the stream computes
  kComm = 1,     // the stream enqueues or waits for communication (exposed communication)
  kHost = 2,     // host work outside the stream (data loading, checkpoint I/O)
};
const char* KindName(Kind kind);  // "compute", "comm", "host"

// Lanes are the trace's tids: one per stream or thread.
enum class Lane : uint8_t { kCompute = 0, kHost = 1 };

struct SpanRecord {
  const char* name = "";  // a string literal
  Kind kind = Kind::kCompute;
  Lane lane = Lane::kCompute;
  int layer = -1;                    // model layer, -1 when none
  int depth = 0;                     // nesting depth on its lane at begin (0 = outermost)
  int64_t begin_ns = 0, end_ns = 0;  // steady_clock, 0 until the stream reached the marker
};

// The label of the innermost span of this thread, for communicator ops.
struct Label {
  const char* phase = nullptr;
  int layer = -1;
};
Label CurrentLabel();

// Collects spans. Thread-safe: stamps come from stream threads.
class Recorder {
 public:
  static int64_t NowNs();
  // Returns the slot of a new span (its begin and end stamped later).
  size_t Open(const char* name, Kind kind, Lane lane, int layer, int depth);
  void StampBegin(size_t slot, int64_t ns);
  void StampEnd(size_t slot, int64_t ns);
  // Hands over every span recorded so far and starts afresh; call when the
  // streams have drained (spans not yet stamped keep end_ns == 0).
  std::vector<SpanRecord> Take();

 private:
  std::mutex mu_;
  std::vector<SpanRecord> spans_;
};

// The process-wide recorder (nullptr: spans are off). Not owned.
void SetRecorder(Recorder* recorder);
Recorder* ActiveRecorder();

class Span {
 public:
  // A span of `stream`'s work on the compute lane.
  Span(Stream& stream, const char* name, Kind kind = Kind::kCompute, int layer = -1);
  // A span of the calling host thread's work (Lane::kHost), timed by the host clock.
  explicit Span(const char* name, int layer = -1);
  ~Span();
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  void Push(const char* name, Kind kind, int layer);
  Stream* stream_ = nullptr;
  Recorder* recorder_ = nullptr;
  size_t slot_ = 0;
  Label saved_;
};

}  // namespace moe::trace

#endif  // MOE_RUNTIME_CORE_TRACE_H_
