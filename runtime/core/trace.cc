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

size_t Recorder::Open(const char* name, Kind kind, Lane lane, int layer, int depth) {
  std::lock_guard<std::mutex> lock(mu_);
  SpanRecord r;
  r.name = name;
  r.kind = kind;
  r.lane = lane;
  r.layer = layer;
  r.depth = depth;
  spans_.push_back(r);
  return spans_.size() - 1;
}

void Recorder::StampBegin(size_t slot, int64_t ns) {
  std::lock_guard<std::mutex> lock(mu_);
  if (slot < spans_.size()) spans_[slot].begin_ns = ns;
}

void Recorder::StampEnd(size_t slot, int64_t ns) {
  std::lock_guard<std::mutex> lock(mu_);
  if (slot < spans_.size()) spans_[slot].end_ns = ns;
}

std::vector<SpanRecord> Recorder::Take() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<SpanRecord> out;
  out.swap(spans_);
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

Span::Span(Stream& stream, const char* name, Kind kind, int layer) {
  recorder_ = ActiveRecorder();
  Push(name, kind, layer);
  if (recorder_ == nullptr) return;
  stream_ = &stream;
  int& depth = t_depth[static_cast<int>(Lane::kCompute)];
  slot_ = recorder_->Open(name, kind, Lane::kCompute, t_label.layer, depth++);
  Recorder* rec = recorder_;
  const size_t slot = slot_;
  // A stamp that cannot be enqueued leaves the span unstamped (dropped from
  // the trace); the stream's own error surfaces from the work around it.
  (void)stream.LaunchHostFunc([rec, slot]() -> absl::Status {
    rec->StampBegin(slot, Recorder::NowNs());
    return absl::OkStatus();
  });
}

Span::Span(const char* name, int layer) {
  recorder_ = ActiveRecorder();
  Push(name, Kind::kHost, layer);
  if (recorder_ == nullptr) return;
  int& depth = t_depth[static_cast<int>(Lane::kHost)];
  slot_ = recorder_->Open(name, Kind::kHost, Lane::kHost, t_label.layer, depth++);
  recorder_->StampBegin(slot_, Recorder::NowNs());
}

Span::~Span() {
#if defined(MOE_NVTX)
  nvtxDomainRangePop(NvtxDomain());
#endif
  t_label = saved_;
  if (recorder_ == nullptr) return;
  if (stream_ != nullptr) {
    --t_depth[static_cast<int>(Lane::kCompute)];
    Recorder* rec = recorder_;
    const size_t slot = slot_;
    (void)stream_->LaunchHostFunc([rec, slot]() -> absl::Status {
      rec->StampEnd(slot, Recorder::NowNs());
      return absl::OkStatus();
    });
  } else {
    --t_depth[static_cast<int>(Lane::kHost)];
    recorder_->StampEnd(slot_, Recorder::NowNs());
  }
}

}  // namespace moe::trace
