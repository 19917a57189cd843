// The profiler: per-step accounting of where a rank's time goes and what its
// all-to-alls move (every step, into metrics.jsonl), and Chrome traces of a
// window of steps (profile.trace).
//
// It is the communicators' CommSink (set it in CommOptions.sink of the world
// communicator before the groups are split, so every group reports to it) and
// the process's trace::Recorder while the trainer runs. Spans (trace.h) give
// the step breakdown: the union of the compute stream's communication spans
// is the exposed communication; the rest of the step is compute. Across ranks
// (StepSummary) the part of a rank's exposed communication that only waits for
// slower ranks, min(exposed, slowest rank's compute - this rank's compute), is
// reported as waiting.
//
// Trace file (one per rank, <trace_dir>/rank_<r>.json, Chrome trace format):
// pid = world rank, named "rank 3 (tp 0, ep 1, dp 1)"; tid 0 = the compute
// stream, tid 1 = host work (data, checkpoint), tid 10+ = one per communicator
// (its progress thread runs ops one at a time). Times are microseconds on rank
// 0's clock (AlignClocks); metadata holds the offset and its error bound.
// Flow arrows join an all-to-all's send to each peer with the peer's
// all-to-all of the same sequence, and a point-to-point send with the peer's
// matching receive. Metadata "wire_bytes_sent" holds what the transport was
// handed per kind and destination over the window (an independent count to
// check the events' per-peer bytes against).
#ifndef MOE_RUNTIME_PROFILER_H_
#define MOE_RUNTIME_PROFILER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "comm/instrumentation.h"
#include "runtime/core/memory.h"
#include "runtime/core/trace.h"

namespace moe {

// One rank's figures for one step.
struct RankStepProfile {
  double step_time_s = 0;
  double compute_s = 0;                 // step time minus exposed communication
  double exposed_comm_s = 0;            // compute stream inside communication spans (enqueue + wait)
  double waiting_s = 0;                 // part of exposed_comm_s spent waiting for slower ranks (StepSummary)
  std::vector<int64_t> mem_peak_bytes;  // per MemoryCategory
  // Per MoE layer (in the order given to BeginStep): all-to-all payload this
  // rank sent (dispatch + combine, forward + backward), the summed duration of
  // those ops, and the bytes sent to each world rank.
  std::vector<int64_t> a2a_bytes;
  std::vector<double> a2a_time_s;
  std::vector<std::vector<int64_t>> a2a_peer_bytes;  // [layer][world rank]
};

struct ProfileOptions {
  bool trace = false;
  std::string trace_dir;
  int trace_start = 1;  // trace steps trace_start + 1 .. trace_start + trace_steps (1-based)
  int trace_steps = 5;
};

class Profiler : public comm::CommSink {
 public:
  Profiler() = default;
  ~Profiler() override;

  // CommSink: called from communication threads.
  void Record(const comm::CommRecord& record) override;

  // Collective over `world`: measures this rank's clock offset to rank 0 by
  // ping-pong (best of several round trips); the error bound is half the
  // best round trip. Called once, at start-up, when tracing.
  absl::Status AlignClocks(comm::Communicator& world);

  // `name` is "rank 3 (tp 0, ep 1, dp 1)". Makes this the active trace::Recorder.
  void Start(const ProfileOptions& options, int world_rank, int world_size, std::string name);
  // Detaches the recorder; writes a trace window that has not been written yet.
  absl::Status Stop();

  // Brackets one training step (1-based step numbers); EndStep fills `out`.
  void BeginStep(int64_t step, const std::vector<int>& moe_layers);
  // The step's end: records a reference event on the compute stream and
  // waits for the stream (the step's one "step end" host wait, returning its
  // first asynchronous error); the host clock read right after it dates the
  // reference, against which EndStep times the spans' events.
  absl::Status SyncStepEnd(Stream& stream);
  void EndStep(double step_time_s, const MemoryTracker& memory, RankStepProfile* out);
  // Per-expert load counters for the trace (global over the EP group), at step end.
  void AddExpertLoad(int layer, const std::vector<int64_t>& tokens_per_expert);
  // Writes the trace after the last step of the window (call after EndStep).
  absl::Status MaybeWriteTrace();

  bool tracing_step() const { return in_window_; }
  double alignment_error_us() const { return alignment_error_ns_ / 1e3; }

  // The sum over ranks of a step: fills waiting_s of each rank in place.
  static void StepSummary(std::vector<RankStepProfile>& ranks);

 private:
  struct Counter {
    std::string name;
    int64_t ns;
    std::vector<std::pair<std::string, int64_t>> values;
  };
  bool InWindow(int64_t step) const;
  std::string TraceJson() const;

  ProfileOptions options_;
  int world_rank_ = 0, world_size_ = 1;
  std::string name_;
  trace::Recorder recorder_;
  bool started_ = false;

  int64_t offset_ns_ = 0;            // add to a local steady_clock time to get rank 0's
  int64_t alignment_error_ns_ = -1;  // -1: not aligned
  int64_t epoch_ns_ = 0;             // rank 0's clock at alignment: the trace's time 0

  // A finished op, with the index of each point-to-point transfer among all
  // transfers between the same two ranks on its group (per group rank; 0
  // when none): a send's n-th transfer to a peer is the peer's n-th receive
  // from it (MPI's order), which pairs the trace's flow arrows.
  struct Op {
    comm::CommRecord r;
    std::vector<uint64_t> p2p_sent_n, p2p_recv_n;
  };

  std::mutex mu_;                                            // guards records_, totals_ and p2p_count_
  std::vector<Op> records_;                                  // of the current step
  std::map<std::string, uint64_t> p2p_count_;                // "group:src>dst" -> transfers so far
  std::map<comm::OpKind, comm::TotalsSink::Totals> totals_;  // of the trace window, per kind

  int64_t step_ = 0;
  int64_t step_begin_ns_ = 0;
  std::vector<int> moe_layers_;
  bool in_window_ = false, written_ = false;
  std::vector<int64_t> traced_steps_;
  std::vector<trace::SpanRecord> trace_spans_;
  std::vector<Op> trace_records_;
  // The wire byte counter (comm/instrumentation.h) when the window opened and
  // at its last step: their difference goes into the trace's metadata.
  std::map<std::pair<comm::OpKind, int>, uint64_t> wire_start_, wire_end_;
  std::vector<Counter> counters_;
  std::unique_ptr<Event> reference_;  // SyncStepEnd's event, completed at reference_ns_
  int64_t reference_ns_ = 0;
};

}  // namespace moe

#endif  // MOE_RUNTIME_PROFILER_H_
