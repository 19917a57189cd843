#include "runtime/core/trace.h"

#include <chrono>

#if defined(MOE_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

namespace moe::trace {
namespace {

std::atomic<Recorder*> g_recorder{nullptr};

#if defined(MOE_NVTX)
// NVTX ranges (CUDA builds) in a domain of their own, "moe", so Nsight
// Systems can show or filter them (nsys profile --nvtx-domain-include=moe):
// the span's name, coloured and categorised by its Kind, the model layer as
// the payload. Pushed and popped on the thread that opens and closes the
// span: the host-side extent of the work it enqueues (the trace's own times
// are the stream's). Without an attached tool each call is one pointer test.
nvtxDomainHandle_t NvtxDomain() {
  static const nvtxDomainHandle_t domain = [] {
    nvtxDomainHandle_t d = nvtxDomainCreateA("moe");
    for (Kind k : {Kind::kCompute, Kind::kComm, Kind::kHost}) {
      nvtxDomainNameCategoryA(d, static_cast<uint32_t>(k) + 1, KindName(k));
    }
    return d;
  }();
  return domain;
}

void NvtxPush(const char* name, Kind kind, int layer) {
  static constexpr uint32_t kColor[] = {0xFF3B7DD8, 0xFFE8823A, 0xFF5DAA4F};  // compute, comm, host (ARGB)
  nvtxEventAttributes_t a = {};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.category = static_cast<uint32_t>(kind) + 1;
  a.colorType = NVTX_COLOR_ARGB;
  a.color = kColor[static_cast<int>(kind)];
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = name;
  if (layer >= 0) {
    a.payloadType = NVTX_PAYLOAD_TYPE_INT32;
    a.payload.iValue = layer;
  }
  nvtxDomainRangePushEx(NvtxDomain(), &a);
}
#endif

// Per host thread: the innermost span's label and the nesting depth per lane.
thread_local Label t_label;
thread_local int t_depth[2] = {0, 0};

}  // namespace

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kCompute:
      return "compute";
    case Kind::kComm:
      return "comm";
    case Kind::kHost:
      return "host";
  }
  return "?";
}

Label CurrentLabel() { return t_label; }

int64_t Recorder::NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t Recorder::Open(const char* name, Kind kind, Lane lane, int layer, int depth,
                        std::unique_ptr<Event> begin, int64_t begin_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = entries_.emplace_back();
  e.id = next_id_++;
  e.record.name = name;
  e.record.kind = kind;
  e.record.lane = lane;
  e.record.layer = layer;
  e.record.depth = depth;
  e.record.begin_ns = begin_ns;
  e.begin = std::move(begin);
  return e.id;
}

void Recorder::Close(uint64_t id, std::unique_ptr<Event> end, int64_t end_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  // Spans nest, so the one to close is almost always among the last.
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) {
    if (it->id != id) continue;
    it->closed = true;
    it->record.end_ns = end_ns;
    it->end = std::move(end);
    return;
  }
}

std::vector<SpanRecord> Recorder::Take(const Event* reference, int64_t reference_ns) {
  std::vector<Entry> taken;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Entry> open;
    for (Entry& e : entries_) (e.closed ? taken : open).push_back(std::move(e));
    entries_.swap(open);
  }
  // The time at which `event` completed, on the host clock.
  auto at = [&](const std::unique_ptr<Event>& event) -> int64_t {
    if (reference == nullptr || event == nullptr) return 0;
    absl::StatusOr<double> ms = reference->ElapsedMsSince(*event);
    if (!ms.ok()) return 0;
    return reference_ns - static_cast<int64_t>(*ms * 1e6 + (*ms >= 0 ? 0.5 : -0.5));
  };
  std::vector<SpanRecord> out;
  out.reserve(taken.size());
  for (Entry& e : taken) {
    if (e.record.lane == Lane::kCompute) {
      e.record.begin_ns = at(e.begin);
      e.record.end_ns = e.record.begin_ns == 0 ? 0 : at(e.end);
      if (e.record.end_ns == 0) e.record.begin_ns = 0;
    }
    out.push_back(e.record);
  }
  return out;
}

void SetRecorder(Recorder* recorder) { g_recorder.store(recorder, std::memory_order_release); }
Recorder* ActiveRecorder() { return g_recorder.load(std::memory_order_acquire); }

void Span::Push(const char* name, Kind kind, int layer) {
  saved_ = t_label;
  t_label = Label{name, layer >= 0 ? layer : saved_.layer};
#if defined(MOE_NVTX)
  NvtxPush(name, kind, t_label.layer);
#else
  (void)kind;
#endif
}

namespace {

// An event recorded at the current end of `stream`, or nullptr when the
// backend could not make or record one (the span is then dropped; the
// stream's own error surfaces from the work around it).
std::unique_ptr<Event> Mark(Stream& stream) {
  absl::StatusOr<std::unique_ptr<Event>> event = stream.backend().CreateEvent();
  if (!event.ok() || !stream.Record(**event).ok()) return nullptr;
  return std::move(*event);
}

}  // namespace

Span::Span(Stream& stream, const char* name, Kind kind, int layer) {
  recorder_ = ActiveRecorder();
  Push(name, kind, layer);
  if (recorder_ == nullptr) return;
  stream_ = &stream;
  int& depth = t_depth[static_cast<int>(Lane::kCompute)];
  id_ = recorder_->Open(name, kind, Lane::kCompute, t_label.layer, depth++, Mark(stream));
}

Span::Span(const char* name, int layer) {
  recorder_ = ActiveRecorder();
  Push(name, Kind::kHost, layer);
  if (recorder_ == nullptr) return;
  int& depth = t_depth[static_cast<int>(Lane::kHost)];
  id_ = recorder_->Open(name, Kind::kHost, Lane::kHost, t_label.layer, depth++, nullptr, Recorder::NowNs());
}

Span::~Span() {
#if defined(MOE_NVTX)
  nvtxDomainRangePop(NvtxDomain());
#endif
  t_label = saved_;
  if (recorder_ == nullptr) return;
  if (stream_ != nullptr) {
    --t_depth[static_cast<int>(Lane::kCompute)];
    recorder_->Close(id_, Mark(*stream_));
  } else {
    --t_depth[static_cast<int>(Lane::kHost)];
    recorder_->Close(id_, nullptr, Recorder::NowNs());
  }
}

}  // namespace moe::trace
