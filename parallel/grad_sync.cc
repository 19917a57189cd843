#include "parallel/grad_sync.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::parallel {

struct GradSync::Bucket {
  comm::Communicator* group = nullptr;
  std::vector<const Parameter*> params;
  std::vector<int64_t> offsets;  // of each parameter in `flat`
  int64_t numel = 0;
  Tensor flat;  // only for buckets of several parameters
  int pending = 0;
  bool launched = false;
  Stream* comm_stream = nullptr;    // the group's
  std::unique_ptr<Event> produced;  // on the compute stream: the grads are written
  std::unique_ptr<Event> reduced;   // on comm_stream: the all-reduce is done
};

GradSync::GradSync(Stream& stream) : stream_(stream) {}

GradSync::~GradSync() {
  // Never leave an all-reduce writing into grads that may be freed.
  for (auto& [group, s] : comm_streams_) (void)s->Synchronize();
}

comm::Communicator* GradSync::GroupFor(const Parameter& p) const {
  if (p.kind == ParamKind::kExpert) {
    if (expert_replicas_ != nullptr && p.shard.tp_dim < 0) return expert_replicas_.get();
    return groups_->edp.get();
  }
  return groups_->dp.get();
}

const comm::Communicator& GradSync::GroupOf(const Parameter& p) const { return *GroupFor(p); }

absl::StatusOr<std::unique_ptr<GradSync>> GradSync::Create(ProcessGroups& groups, const ParameterList& params,
                                                           Stream& stream, const GradSyncOptions& options) {
  if (groups.world == nullptr || groups.dp == nullptr || groups.edp == nullptr) {
    return absl::InvalidArgumentError(
        "GradSync::Create: process groups are not initialised (world, dp, edp)");
  }
  std::unique_ptr<GradSync> sync(new GradSync(stream));
  sync->groups_ = &groups;
  if (groups.layout.tp > 1) {
    // Ranks holding the same experts, whatever their TP rank and EP group.
    ASSIGN_OR_RETURN(sync->expert_replicas_,
                     groups.world->Split(groups.layout.ep_rank, groups.layout.rank,
                                         absl::StrCat("expert_replicas", groups.layout.ep_rank)));
  }
  const int64_t cap_bytes = options.bucket_mb > 0 ? static_cast<int64_t>(options.bucket_mb * 1024 * 1024) : 0;
  std::unordered_map<comm::Communicator*, int> open;  // group -> open bucket index
  const auto& all = params.all();
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    const Parameter* p = *it;
    if (!p->grad.defined() || p->grad.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("GradSync::Create: parameter ", p->name, " has grad ",
                                                     p->grad.defined() ? p->grad.ToString() : "undefined",
                                                     "; an f32 gradient tensor is required"));
    }
    comm::Communicator* g = sync->GroupFor(*p);
    auto o = open.find(g);
    if (o == open.end()) {
      sync->buckets_.push_back(std::make_unique<Bucket>());
      sync->buckets_.back()->group = g;
      o = open.emplace(g, static_cast<int>(sync->buckets_.size()) - 1).first;
    }
    Bucket& b = *sync->buckets_[o->second];
    b.offsets.push_back(b.numel);
    b.params.push_back(p);
    b.numel += p->grad.numel();
    sync->bucket_of_[p] = o->second;
    sync->ready_[p] = false;
    if (b.numel * static_cast<int64_t>(sizeof(float)) >= cap_bytes) open.erase(o);
  }
  for (auto& b : sync->buckets_) {
    b->pending = static_cast<int>(b->params.size());
    std::unique_ptr<Stream>& cs = sync->comm_streams_[b->group];
    if (cs == nullptr) {
      ASSIGN_OR_RETURN(cs, stream.backend().CreateStream(StreamMode::kWorker));
    }
    b->comm_stream = cs.get();
    ASSIGN_OR_RETURN(b->produced, stream.backend().CreateEvent());
    ASSIGN_OR_RETURN(b->reduced, stream.backend().CreateEvent());
    if (b->params.size() > 1 && b->group->size() > 1) {
      ASSIGN_OR_RETURN(b->flat, Tensor::Empty(stream.backend(), Shape{b->numel}, DType::kF32,
                                              MemoryCategory::kCommunication));
    }
  }
  return sync;
}

absl::Status GradSync::Launch(Bucket& b) {
  b.launched = true;
  if (b.group->size() == 1 || b.numel == 0) return absl::OkStatus();
  void* data;
  if (b.params.size() == 1) {
    data = b.params[0]->grad.raw_data();
  } else {
    for (size_t i = 0; i < b.params.size(); ++i) {
      const Tensor& g = b.params[i]->grad;
      RETURN_IF_ERROR(ops::Copy(stream_, g, b.flat.Slice(b.offsets[i], b.offsets[i] + g.numel())));
    }
    data = b.flat.raw_data();
  }
  // The grads (and the copies) were written on the compute stream.
  RETURN_IF_ERROR(stream_.Record(*b.produced));
  RETURN_IF_ERROR(b.comm_stream->Wait(*b.produced));
  RETURN_IF_ERROR(b.group->AllReduce(data, data, static_cast<size_t>(b.numel), DType::kF32,
                                     comm::ReduceOp::kSum, *b.comm_stream));
  RETURN_IF_ERROR(b.comm_stream->Record(*b.reduced));
  step_bytes_ += b.numel * static_cast<int64_t>(sizeof(float));
  return absl::OkStatus();
}

absl::Status GradSync::MarkReady(const Parameter* p) {
  auto it = bucket_of_.find(p);
  if (it == bucket_of_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("GradSync::MarkReady: parameter ",
                                                   p != nullptr ? p->name : "(null)",
                                                   " is not in the list GradSync was created with"));
  }
  bool& ready = ready_[p];
  if (ready) {
    return absl::FailedPreconditionError(
        absl::StrCat("GradSync::MarkReady: parameter ", p->name, " was already marked ready this step"));
  }
  ready = true;
  Bucket& b = *buckets_[it->second];
  if (--b.pending == 0 && !b.launched) return Launch(b);
  return absl::OkStatus();
}

absl::Status GradSync::Finish() {
  absl::Status first;
  for (auto& b : buckets_) {
    if (!b->launched) first.Update(Launch(*b));
  }
  for (auto& b : buckets_) {
    // The compute stream (not the host) waits for the reduction.
    first.Update(stream_.Wait(*b->reduced));
    if (b->flat.defined() && first.ok()) {
      for (size_t i = 0; i < b->params.size(); ++i) {
        const Tensor& g = b->params[i]->grad;
        first.Update(ops::Copy(stream_, b->flat.Slice(b->offsets[i], b->offsets[i] + g.numel()), g));
      }
    }
    b->launched = false;
    b->pending = static_cast<int>(b->params.size());
  }
  for (auto& [p, r] : ready_) r = false;
  last_step_bytes_ = step_bytes_;
  step_bytes_ = 0;
  return first;
}

int GradSync::launched_buckets() const {
  int n = 0;
  for (const auto& b : buckets_) n += b->launched ? 1 : 0;
  return n;
}

std::vector<GradSync::BucketInfo> GradSync::buckets() const {
  std::vector<BucketInfo> out;
  for (const auto& b : buckets_) {
    BucketInfo info;
    info.group = b->group->name();
    for (const Parameter* p : b->params) info.names.push_back(p->name);
    info.numel = b->numel;
    out.push_back(std::move(info));
  }
  return out;
}

}  // namespace moe::parallel
