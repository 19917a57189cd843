#include "runtime/profiler.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/core/json.h"
#include "runtime/core/status.h"

namespace moe {
namespace {

int64_t Ns(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

bool IsAllToAll(comm::OpKind k) { return k == comm::OpKind::kAllToAll || k == comm::OpKind::kAllToAllV; }
bool IsPointToPoint(comm::OpKind k) {
  return k == comm::OpKind::kSend || k == comm::OpKind::kRecv || k == comm::OpKind::kGroupP2P;
}

// One instance of a group: its name and members ("ep0.1.3").
std::string GroupKey(const comm::CommRecord& r) {
  std::string key = r.group;
  for (int w : r.group_ranks) absl::StrAppend(&key, ".", w);
  return key;
}

// Union length of [begin, end) intervals.
int64_t UnionNs(std::vector<std::pair<int64_t, int64_t>> v) {
  std::sort(v.begin(), v.end());
  int64_t total = 0, cur_b = 0, cur_e = -1;
  for (const auto& [b, e] : v) {
    if (e <= b) continue;
    if (b > cur_e) {
      if (cur_e > cur_b) total += cur_e - cur_b;
      cur_b = b;
      cur_e = e;
    } else {
      cur_e = std::max(cur_e, e);
    }
  }
  if (cur_e > cur_b) total += cur_e - cur_b;
  return total;
}

// 53-bit FNV-1a: a flow id that JSON readers hold exactly.
uint64_t FlowId(const std::string& key) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
  return h & ((uint64_t{1} << 53) - 1);
}

}  // namespace

Profiler::~Profiler() {
  if (trace::ActiveRecorder() == &recorder_) trace::SetRecorder(nullptr);
}

void Profiler::Record(const comm::CommRecord& record) {
  std::lock_guard<std::mutex> lock(mu_);
  Op& op = records_.emplace_back();
  op.r = record;
  if (IsPointToPoint(record.kind) && record.rank < static_cast<int>(record.group_ranks.size())) {
    const std::string group = GroupKey(record);
    const int me = record.group_ranks[record.rank];
    const size_t n = record.group_ranks.size();
    op.p2p_sent_n.assign(n, 0);
    op.p2p_recv_n.assign(n, 0);
    for (size_t p = 0; p < n && p < record.peer_bytes_sent.size(); ++p) {
      const int peer = record.group_ranks[p];
      if (record.peer_bytes_sent[p] > 0)
        op.p2p_sent_n[p] = p2p_count_[absl::StrCat(group, ":", me, ">", peer)]++;
      if (record.peer_bytes_received[p] > 0)
        op.p2p_recv_n[p] = p2p_count_[absl::StrCat(group, ":", peer, ">", me)]++;
    }
  }
  if (in_window_) {
    comm::TotalsSink::Totals& t = totals_[record.kind];
    ++t.count;
    if (!record.ok) ++t.failed;
    t.bytes_sent += record.bytes_sent;
    t.bytes_received += record.bytes_received;
    t.seconds += record.seconds();
  }
}

absl::Status Profiler::AlignClocks(comm::Communicator& world) {
  constexpr int kRounds = 8;
  const int me = world.rank(), n = world.size();
  int64_t best_rtt = -1;
  for (int peer = 1; peer < n; ++peer) {
    if (me != 0 && me != peer) continue;
    for (int round = 0; round < kRounds; ++round) {
      int64_t value = 0;
      if (me == 0) {
        ASSIGN_OR_RETURN(comm::Work r, world.Recv(&value, 1, DType::kI64, peer));
        RETURN_IF_ERROR(r.Wait());
        value = trace::Recorder::NowNs();
        ASSIGN_OR_RETURN(comm::Work s, world.Send(&value, 1, DType::kI64, peer));
        RETURN_IF_ERROR(s.Wait());
      } else {
        const int64_t t1 = trace::Recorder::NowNs();
        ASSIGN_OR_RETURN(comm::Work s, world.Send(&t1, 1, DType::kI64, 0));
        RETURN_IF_ERROR(s.Wait());
        ASSIGN_OR_RETURN(comm::Work r, world.Recv(&value, 1, DType::kI64, 0));
        RETURN_IF_ERROR(r.Wait());
        const int64_t t2 = trace::Recorder::NowNs();
        if (best_rtt < 0 || t2 - t1 < best_rtt) {
          best_rtt = t2 - t1;
          offset_ns_ = value - (t1 + t2) / 2;
        }
      }
    }
  }
  alignment_error_ns_ = me == 0 ? 0 : best_rtt / 2;
  int64_t epoch = me == 0 ? trace::Recorder::NowNs() : 0;
  ASSIGN_OR_RETURN(comm::Work b, world.Broadcast(&epoch, &epoch, 1, DType::kI64, 0));
  RETURN_IF_ERROR(b.Wait());
  epoch_ns_ = epoch;
  return absl::OkStatus();
}

void Profiler::Start(const ProfileOptions& options, int world_rank, int world_size, std::string name) {
  options_ = options;
  world_rank_ = world_rank;
  world_size_ = world_size;
  name_ = std::move(name);
  started_ = true;
  trace::SetRecorder(&recorder_);
}

absl::Status Profiler::Stop() {
  if (trace::ActiveRecorder() == &recorder_) trace::SetRecorder(nullptr);
  if (!started_ || !options_.trace || written_ || traced_steps_.empty()) return absl::OkStatus();
  in_window_ = false;
  return MaybeWriteTrace();
}

bool Profiler::InWindow(int64_t step) const {
  return options_.trace && step > options_.trace_start && step <= options_.trace_start + options_.trace_steps;
}

void Profiler::BeginStep(int64_t step, const std::vector<int>& moe_layers) {
  step_ = step;
  moe_layers_ = moe_layers;
  step_begin_ns_ = trace::Recorder::NowNs();
  const bool window = InWindow(step);
  std::lock_guard<std::mutex> lock(mu_);
  // What arrived between steps (eval, checkpoint save, stop agreement) goes
  // to the trace when the window is open, and is not this step's.
  if (in_window_) trace_records_.insert(trace_records_.end(), records_.begin(), records_.end());
  records_.clear();
  in_window_ = window && !written_;
  if (in_window_ && traced_steps_.empty()) wire_start_ = comm::WireBytesSnapshot();
  if (in_window_) traced_steps_.push_back(step);
}

absl::Status Profiler::SyncStepEnd(Stream& stream) {
  reference_.reset();
  reference_ns_ = 0;
  absl::StatusOr<std::unique_ptr<Event>> e = stream.backend().CreateEvent();
  const bool recorded = e.ok() && stream.Record(**e).ok();
  RETURN_IF_ERROR(stream.Synchronize());
  if (recorded) {
    reference_ns_ = trace::Recorder::NowNs();
    reference_ = std::move(*e);
  }
  return absl::OkStatus();
}

void Profiler::EndStep(double step_time_s, const MemoryTracker& memory, RankStepProfile* out) {
  std::vector<trace::SpanRecord> spans = recorder_.Take(reference_.get(), reference_ns_);
  std::vector<Op> records;
  {
    std::lock_guard<std::mutex> lock(mu_);
    records.swap(records_);
    if (in_window_) wire_end_ = comm::WireBytesSnapshot();
  }
  *out = RankStepProfile();
  out->step_time_s = step_time_s;
  std::vector<std::pair<int64_t, int64_t>> comm;
  for (const trace::SpanRecord& s : spans) {
    if (s.kind == trace::Kind::kComm && s.lane == trace::Lane::kCompute && s.begin_ns > 0 && s.end_ns > 0)
      comm.emplace_back(std::max(s.begin_ns, step_begin_ns_), s.end_ns);
  }
  out->exposed_comm_s = std::min(step_time_s, UnionNs(std::move(comm)) / 1e9);
  out->compute_s = step_time_s - out->exposed_comm_s;
  for (int c = 0; c < kNumMemoryCategories; ++c)
    out->mem_peak_bytes.push_back(memory.Stats(static_cast<MemoryCategory>(c)).peak_bytes);
  const size_t L = moe_layers_.size();
  out->a2a_bytes.assign(L, 0);
  out->a2a_time_s.assign(L, 0.0);
  out->a2a_peer_bytes.assign(L, std::vector<int64_t>(world_size_, 0));
  for (const Op& op : records) {
    const comm::CommRecord& r = op.r;
    if (!IsAllToAll(r.kind)) continue;
    auto it = std::find(moe_layers_.begin(), moe_layers_.end(), r.layer);
    if (it == moe_layers_.end()) continue;
    const size_t i = it - moe_layers_.begin();
    out->a2a_bytes[i] += static_cast<int64_t>(r.bytes_sent);
    out->a2a_time_s[i] += r.seconds();
    for (size_t p = 0; p < r.peer_bytes_sent.size() && p < r.group_ranks.size(); ++p) {
      const int w = r.group_ranks[p];
      if (w >= 0 && w < world_size_) out->a2a_peer_bytes[i][w] += static_cast<int64_t>(r.peer_bytes_sent[p]);
    }
  }
  if (in_window_) {
    for (trace::SpanRecord& s : spans) trace_spans_.push_back(s);
    trace_records_.insert(trace_records_.end(), records.begin(), records.end());
    Counter mem{"memory (bytes)", trace::Recorder::NowNs(), {}};
    for (int c = 0; c < kNumMemoryCategories; ++c) {
      const auto cat = static_cast<MemoryCategory>(c);
      mem.values.emplace_back(MemoryCategoryName(cat), memory.Stats(cat).live_bytes);
    }
    counters_.push_back(std::move(mem));
  }
}

void Profiler::AddExpertLoad(int layer, const std::vector<int64_t>& tokens_per_expert) {
  if (!in_window_) return;
  Counter c{absl::StrCat("expert load L", layer), trace::Recorder::NowNs(), {}};
  for (size_t e = 0; e < tokens_per_expert.size(); ++e)
    c.values.emplace_back(absl::StrCat("e", e), tokens_per_expert[e]);
  counters_.push_back(std::move(c));
}

void Profiler::StepSummary(std::vector<RankStepProfile>& ranks) {
  double slowest = 0;
  for (const RankStepProfile& r : ranks) slowest = std::max(slowest, r.compute_s);
  for (RankStepProfile& r : ranks) {
    r.waiting_s = std::clamp(slowest - r.compute_s, 0.0, r.exposed_comm_s);
    r.exposed_comm_s -= r.waiting_s;
  }
}

absl::Status Profiler::MaybeWriteTrace() {
  if (!options_.trace || written_ || traced_steps_.empty()) return absl::OkStatus();
  if (in_window_ && step_ < options_.trace_start + options_.trace_steps) return absl::OkStatus();
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_window_ = false;
  }
  written_ = true;
  std::error_code ec;
  std::filesystem::create_directories(options_.trace_dir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create profile.trace_dir '", options_.trace_dir, "': ", ec.message()));
  }
  const std::string path = absl::StrCat(options_.trace_dir, "/rank_", world_rank_, ".json");
  const std::string tmp = path + ".tmp";
  const std::string text = TraceJson();
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr)
    return absl::UnavailableError(absl::StrCat("cannot write trace '", tmp, "': ", std::strerror(errno)));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok) {
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat("writing trace '", tmp, "' failed: ", std::strerror(errno)));
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::DataLossError(absl::StrCat("renaming '", tmp, "' failed: ", ec.message()));
  trace_spans_.clear();
  trace_records_.clear();
  counters_.clear();
  return absl::OkStatus();
}

std::string Profiler::TraceJson() const {
  auto us = [this](int64_t ns) { return absl::StrFormat("%.3f", (ns + offset_ns_ - epoch_ns_) / 1e3); };
  const int pid = world_rank_;
  std::vector<std::string> ev;
  ev.push_back(absl::StrCat(R"({"ph":"M","name":"process_name","pid":)", pid, R"(,"args":{"name":")",
                            JsonEscape(name_), "\"}}"));
  ev.push_back(absl::StrCat(R"({"ph":"M","name":"process_sort_index","pid":)", pid,
                            R"(,"args":{"sort_index":)", pid, "}}"));
  auto thread = [&](int tid, const std::string& name) {
    ev.push_back(absl::StrCat(R"({"ph":"M","name":"thread_name","pid":)", pid, R"(,"tid":)", tid,
                              R"(,"args":{"name":")", JsonEscape(name), "\"}}"));
  };
  thread(0, "compute stream");
  thread(1, "host");
  for (const trace::SpanRecord& s : trace_spans_) {
    if (s.begin_ns <= 0 || s.end_ns < s.begin_ns) continue;
    const bool layer_span = std::strcmp(s.name, "forward") == 0 || std::strcmp(s.name, "backward") == 0;
    const std::string name = layer_span && s.layer >= 0 ? absl::StrCat(s.name, " L", s.layer) : s.name;
    ev.push_back(absl::StrCat(R"({"ph":"X","name":")", JsonEscape(name), R"(","cat":")",
                              trace::KindName(s.kind), R"(","pid":)", pid, R"(,"tid":)",
                              static_cast<int>(s.lane), R"(,"ts":)", us(s.begin_ns), R"(,"dur":)",
                              absl::StrFormat("%.3f", (s.end_ns - s.begin_ns) / 1e3), R"(,"args":{"layer":)",
                              s.layer, R"(,"phase":")", JsonEscape(s.name), "\"}}"));
  }
  std::map<std::string, int> tids;
  for (const Op& op : trace_records_) {
    const comm::CommRecord& r = op.r;
    auto [it, fresh] = tids.emplace(r.group, 10 + static_cast<int>(tids.size()));
    if (fresh) thread(it->second, "comm " + r.group);
    const int tid = it->second;
    const int64_t b = Ns(r.started), e = std::max(Ns(r.finished), b);
    std::string peers, sent, received;
    for (size_t p = 0; p < r.group_ranks.size(); ++p) {
      absl::StrAppend(&peers, p ? "," : "", r.group_ranks[p]);
      if (p < r.peer_bytes_sent.size()) {
        absl::StrAppend(&sent, sent.empty() ? "" : ",", "\"", r.group_ranks[p], "\":", r.peer_bytes_sent[p]);
        absl::StrAppend(&received, received.empty() ? "" : ",", "\"", r.group_ranks[p],
                        "\":", r.peer_bytes_received[p]);
      }
    }
    ev.push_back(absl::StrCat(
        R"({"ph":"X","name":")", comm::OpKindName(r.kind), R"(","cat":"comm_op","pid":)", pid, R"(,"tid":)",
        tid, R"(,"ts":)", us(b), R"(,"dur":)", absl::StrFormat("%.3f", (e - b) / 1e3),
        R"(,"args":{"group":")", JsonEscape(r.group), R"(","sequence":)", r.sequence, R"(,"group_ranks":[)",
        peers, R"(],"bytes_sent":)", r.bytes_sent, R"(,"bytes_received":)", r.bytes_received,
        R"(,"peer_bytes_sent":{)", sent, R"(},"peer_bytes_received":{)", received, R"(},"phase":")",
        JsonEscape(r.phase ? r.phase : ""), R"(","layer":)", r.layer, R"(,"ok":)", r.ok ? "true" : "false",
        "}}"));
    // Flow arrows, for every peer that gets bytes: from this rank's
    // all-to-all to the peer's all-to-all of the same group instance and
    // sequence; from a point-to-point send to the peer's matching receive
    // (the n-th transfer between the two on the group).
    const bool a2a = IsAllToAll(r.kind), p2p = !op.p2p_sent_n.empty();
    if (!a2a && !p2p) continue;
    const std::string group_key = GroupKey(r);
    auto key = [&](size_t p, int src, int dst, bool sent) {
      if (a2a) return absl::StrCat(group_key, "#", r.sequence, ":", src, ">", dst);
      return absl::StrCat(group_key, ":", src, ">", dst, "#p2p", sent ? op.p2p_sent_n[p] : op.p2p_recv_n[p]);
    };
    const char* flow = a2a ? "a2a" : "p2p";
    for (size_t p = 0; p < r.peer_bytes_sent.size() && p < r.group_ranks.size(); ++p) {
      const int peer = r.group_ranks[p];
      if (r.peer_bytes_sent[p] > 0) {
        ev.push_back(absl::StrCat(R"({"ph":"s","name":")", flow, R"(","cat":"flow","id":)",
                                  FlowId(key(p, world_rank_, peer, true)), R"(,"pid":)", pid, R"(,"tid":)",
                                  tid, R"(,"ts":)", us(b), "}"));
      }
      if (r.peer_bytes_received[p] > 0) {
        ev.push_back(absl::StrCat(R"({"ph":"f","bp":"e","name":")", flow, R"(","cat":"flow","id":)",
                                  FlowId(key(p, peer, world_rank_, false)), R"(,"pid":)", pid, R"(,"tid":)",
                                  tid, R"(,"ts":)", us(e), "}"));
      }
    }
  }
  for (const Counter& c : counters_) {
    std::string args;
    for (const auto& [k, v] : c.values)
      absl::StrAppend(&args, args.empty() ? "" : ",", "\"", JsonEscape(k), "\":", v);
    ev.push_back(absl::StrCat(R"({"ph":"C","name":")", JsonEscape(c.name), R"(","pid":)", pid, R"(,"ts":)",
                              us(c.ns), R"(,"args":{)", args, "}}"));
  }
  std::string totals;
  for (const auto& [kind, t] : totals_) {
    absl::StrAppend(&totals, totals.empty() ? "" : ",", "\"", comm::OpKindName(kind),
                    "\":{\"count\":", t.count, ",\"bytes_sent\":", t.bytes_sent,
                    ",\"bytes_received\":", t.bytes_received, "}");
  }
  // The wire counter's bytes over the window, for the kinds whose events
  // carry per-peer bytes.
  std::map<comm::OpKind, std::string> wire;
  for (const auto& [key, bytes] : wire_end_) {
    const auto start = wire_start_.find(key);
    const uint64_t delta = bytes - (start == wire_start_.end() ? 0 : start->second);
    if (delta == 0 || !(IsAllToAll(key.first) || IsPointToPoint(key.first))) continue;
    std::string& w = wire[key.first];
    absl::StrAppend(&w, w.empty() ? "" : ",", "\"", key.second, "\":", delta);
  }
  std::string wire_json;
  for (const auto& [kind, w] : wire)
    absl::StrAppend(&wire_json, wire_json.empty() ? "" : ",", "\"", comm::OpKindName(kind), "\":{", w, "}");
  std::string steps;
  for (int64_t s : traced_steps_) absl::StrAppend(&steps, steps.empty() ? "" : ",", s);
  std::string out = "{\"traceEvents\":[\n";
  for (size_t i = 0; i < ev.size(); ++i) absl::StrAppend(&out, ev[i], i + 1 < ev.size() ? ",\n" : "\n");
  absl::StrAppend(&out, "],\"displayTimeUnit\":\"ms\",\"metadata\":{\"rank\":", world_rank_,
                  ",\"world_size\":", world_size_, ",\"name\":\"", JsonEscape(name_),
                  "\",\"clock_offset_ns\":", offset_ns_,
                  ",\"clock_alignment_error_us\":", absl::StrFormat("%.3f", alignment_error_ns_ / 1e3),
                  ",\"steps\":[", steps, "],\"comm_totals\":{", totals, "},\"wire_bytes_sent\":{", wire_json,
                  "}}}\n");
  return out;
}

}  // namespace moe
