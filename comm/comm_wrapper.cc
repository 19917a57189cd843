#include "comm/comm_wrapper.h"

#include <chrono>
#include <cstdlib>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "comm/mpi_env.h"
#include "runtime/core/status.h"

namespace moe::comm {
namespace {

absl::Status Bad(const std::string& var, const std::string& text, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(var, "=\"", text, "\": ", why));
}

absl::StatusOr<OpKind> ParseKind(const std::string& name) {
  for (int k = 0; k <= static_cast<int>(OpKind::kSplit); ++k) {
    if (name == OpKindName(static_cast<OpKind>(k))) return static_cast<OpKind>(k);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("kind=", name,
                   " is not an operation (AllReduce, Broadcast, AllGather, "
                   "AllGatherV, ReduceScatter, AllToAll, AllToAllV, Send, Recv, "
                   "GroupP2P, Barrier)"));
}

void SleepFor(double seconds) {
  if (seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

class CommWrapper : public Communicator {
 public:
  CommWrapper(std::unique_ptr<Communicator> target, WrapperOptions options)
      : Communicator(target->rank(), target->size(), target->group_ranks(), target->options()),
        target_(std::move(target)),
        wrap_(std::move(options)) {}

  Device device() const override { return target_->device(); }
  const char* backend_name() const override { return target_->backend_name(); }

 protected:
  absl::StatusOr<Work> Submit(OpDesc op) override {
    op.inject = [link = wrap_.link, faults = wrap_.faults, group = name()](const OpDesc& d) {
      return Inject(link, faults, group, d);
    };
    return SubmitTo(*target_, std::move(op));
  }

  absl::StatusOr<std::unique_ptr<Communicator>> SplitImpl(OpDesc op, CommOptions child) override {
    ASSIGN_OR_RETURN(std::unique_ptr<Communicator> split,
                     target_->Split(op.split_color, op.split_key, child.name));
    if (split == nullptr) return split;
    return WrapCommunicator(std::move(split), wrap_);
  }

 private:
  // Runs on the wrapped backend's progress thread, inside the deadline.
  static absl::Status Inject(const LinkShape& link, const std::vector<FaultSpec>& faults,
                             const std::string& group, const OpDesc& op) {
    if (link.active()) {
      const double bytes = static_cast<double>(std::max(op.bytes_sent, op.bytes_received));
      SleepFor(link.latency_us * 1e-6 +
               (link.bandwidth_gbps > 0 ? bytes / (link.bandwidth_gbps * 1e9) : 0.0));
    }
    for (const FaultSpec& f : faults) {
      if (f.kind != op.kind || f.sequence != op.sequence) continue;
      if (f.world_rank >= 0 && f.world_rank != MpiEnv::world_rank()) continue;
      if (!f.group_prefix.empty() && !absl::StartsWith(group, f.group_prefix)) continue;
      switch (f.action) {
        case FaultSpec::Action::kFail:
          return absl::UnavailableError(absl::StrCat("injected failure (MOE_COMM_FAULT) of ",
                                                     OpKindName(op.kind), " #", op.sequence, " on group '",
                                                     group, "', world rank ", MpiEnv::world_rank()));
        case FaultSpec::Action::kDelay:
          SleepFor(f.delay_s);
          break;
        case FaultSpec::Action::kHang:
          for (;;) SleepFor(1.0);  // until the watchdog aborts the job
      }
    }
    return absl::OkStatus();
  }

  std::unique_ptr<Communicator> target_;
  WrapperOptions wrap_;
};

}  // namespace

absl::StatusOr<LinkShape> ParseLinkShape(const std::string& text) {
  LinkShape link;
  for (absl::string_view field : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(field, absl::MaxSplits('=', 1));
    double v = 0;
    if (!absl::SimpleAtod(kv.second, &v) || v < 0) {
      return Bad("MOE_COMM_LINK", text, absl::StrCat(kv.first, "=", kv.second, " must be a number >= 0"));
    }
    if (kv.first == "bandwidth_gbps") {
      link.bandwidth_gbps = v;
    } else if (kv.first == "latency_us") {
      link.latency_us = v;
    } else {
      return Bad("MOE_COMM_LINK", text,
                 absl::StrCat("unknown field '", kv.first, "' (bandwidth_gbps, latency_us)"));
    }
  }
  return link;
}

absl::StatusOr<std::vector<FaultSpec>> ParseFaults(const std::string& text) {
  std::vector<FaultSpec> faults;
  for (absl::string_view one : absl::StrSplit(text, ';', absl::SkipWhitespace())) {
    FaultSpec f;
    bool has_kind = false, has_seq = false, has_action = false;
    for (absl::string_view field : absl::StrSplit(one, ',', absl::SkipWhitespace())) {
      std::pair<std::string, std::string> kv = absl::StrSplit(field, absl::MaxSplits('=', 1));
      const std::string& key = kv.first;
      const std::string& value = kv.second;
      if (key == "kind") {
        absl::StatusOr<OpKind> kind = ParseKind(value);
        if (!kind.ok()) return Bad("MOE_COMM_FAULT", text, std::string(kind.status().message()));
        f.kind = *kind;
        has_kind = true;
      } else if (key == "seq") {
        if (!absl::SimpleAtoi(value, &f.sequence))
          return Bad("MOE_COMM_FAULT", text, "seq must be an integer >= 0");
        has_seq = true;
      } else if (key == "rank") {
        if (!absl::SimpleAtoi(value, &f.world_rank) || f.world_rank < -1) {
          return Bad("MOE_COMM_FAULT", text, "rank must be a world rank, or -1 for every rank");
        }
      } else if (key == "group") {
        f.group_prefix = value;
      } else if (key == "delay_s") {
        if (!absl::SimpleAtod(value, &f.delay_s) || f.delay_s < 0) {
          return Bad("MOE_COMM_FAULT", text, "delay_s must be a number of seconds >= 0");
        }
      } else if (key == "action") {
        has_action = true;
        if (value == "fail") {
          f.action = FaultSpec::Action::kFail;
        } else if (value == "delay") {
          f.action = FaultSpec::Action::kDelay;
        } else if (value == "hang") {
          f.action = FaultSpec::Action::kHang;
        } else {
          return Bad("MOE_COMM_FAULT", text, absl::StrCat("action=", value, " must be fail, delay or hang"));
        }
      } else {
        return Bad("MOE_COMM_FAULT", text,
                   absl::StrCat("unknown field '", key, "' (rank, kind, seq, action, group, delay_s)"));
      }
    }
    if (!has_kind || !has_seq || !has_action) {
      return Bad("MOE_COMM_FAULT", text,
                 "each fault needs kind=, seq= and action= (e.g. rank=1,kind=AllToAllV,seq=3,action=hang)");
    }
    faults.push_back(std::move(f));
  }
  return faults;
}

absl::StatusOr<WrapperOptions> WrapperOptionsFromEnv() {
  WrapperOptions options;
  if (const char* link = std::getenv("MOE_COMM_LINK"); link != nullptr && *link != '\0') {
    ASSIGN_OR_RETURN(options.link, ParseLinkShape(link));
  }
  if (const char* fault = std::getenv("MOE_COMM_FAULT"); fault != nullptr && *fault != '\0') {
    ASSIGN_OR_RETURN(options.faults, ParseFaults(fault));
  }
  return options;
}

std::unique_ptr<Communicator> WrapCommunicator(std::unique_ptr<Communicator> target, WrapperOptions options) {
  return std::make_unique<CommWrapper>(std::move(target), std::move(options));
}

}  // namespace moe::comm
