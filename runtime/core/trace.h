// Spans for the profiler: named intervals of a stream's work (forward and
// backward phases per layer, grad sync, optimizer, ...) or of a host thread
// (data loading, checkpoint save).
//
// A Span is RAII. When a Recorder is active (trace::SetRecorder), a stream
// span is timed by the backend's events: it records an Event on the stream
// where it begins and another where it ends, and the Recorder turns them into
// times once they completed (Event::ElapsedMsSince against one reference
// event whose host time is known, see Recorder::Take). So the times are
// those of the stream's work (cudaEventElapsedTime on CUDA; on a CPU worker
// stream, when the worker reached the marker), not of the host calls that
// enqueued it. A host span (data loading, checkpoint save) is timed by the
// host clock. In CUDA builds every span is also an NVTX range in the "moe"
// domain (its name, colour and category by Kind, the layer as payload; pushed
// and popped on the enqueueing thread), recorder or not, so Nsight Systems
// shows the phases without profile.trace. With no active recorder a span costs
// one atomic load.
//
// Spans also label communicator ops: CurrentLabel() is the innermost span of
// the calling thread, which the communicator front end copies into each op it
// enqueues (host and stream forms), so the profiler attributes every op to
// its layer and phase.
#ifndef MOE_RUNTIME_CORE_TRACE_H_
#define MOE_RUNTIME_CORE_TRACE_H_

#include <atomic>
#include <cstdint>
#include <memory>
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
  int64_t begin_ns = 0, end_ns = 0;  // steady_clock; 0 when the span could not be timed
};

// The label of the innermost span of this thread, for communicator ops.
struct Label {
  const char* phase = nullptr;
  int layer = -1;
};
Label CurrentLabel();

// Collects spans. Thread-safe.
class Recorder {
 public:
  static int64_t NowNs();
  // A stream span begins at `begin` (recorded on its stream; nullptr when it
  // could not be, which drops the span) or a host span at `begin_ns`.
  // Returns the span's id for Close.
  uint64_t Open(const char* name, Kind kind, Lane lane, int layer, int depth, std::unique_ptr<Event> begin,
                int64_t begin_ns = 0);
  void Close(uint64_t id, std::unique_ptr<Event> end, int64_t end_ns = 0);
  // Hands over the spans closed so far (spans still open stay) with their
  // times: a stream span's begin and end are reference_ns minus
  // reference.ElapsedMsSince(its event), where `reference` completed at host
  // time `reference_ns` and after every event of the spans handed over (call
  // when the streams have drained). A span whose events cannot be timed
  // keeps begin_ns == 0 (readers drop it).
  std::vector<SpanRecord> Take(const Event* reference, int64_t reference_ns);

 private:
  struct Entry {
    uint64_t id = 0;
    bool closed = false;
    SpanRecord record;
    std::unique_ptr<Event> begin, end;
  };
  std::mutex mu_;
  uint64_t next_id_ = 1;
  std::vector<Entry> entries_;
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
  uint64_t id_ = 0;
  Label saved_;
};

}  // namespace moe::trace

#endif  // MOE_RUNTIME_CORE_TRACE_H_
