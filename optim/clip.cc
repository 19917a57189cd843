#include "optim/clip.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe::optim {
namespace {

// Sum of squares of an f32 tensor, accumulated in double on the host when the
// host can read it, else by the device's ReduceSumSquares.
absl::StatusOr<double> SumSquares(const Tensor& t) {
  if (t.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("gradient norm: ", t.ToString(), " is not f32"));
  }
  if (t.buffer()->host_visible()) {
    const float* x = static_cast<const float*>(t.raw_data());
    double sum = 0;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
    return sum;
  }
  ASSIGN_OR_RETURN(Backend * device, GetBackend(t.device()));
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Tensor out, Tensor::Empty(*device, Shape{1}, DType::kF32, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor host, Tensor::Empty(*cpu, Shape{1}, DType::kF32, MemoryCategory::kOther));
  Stream& stream = device->default_stream();
  RETURN_IF_ERROR(ops::ReduceSumSquares(stream, t, out));
  RETURN_IF_ERROR(ops::Copy(stream, out, host));
  RETURN_IF_ERROR(stream.Synchronize());
  return static_cast<double>(host.data<float>()[0]);
}

// Is every element of the f32 tensor finite?
absl::StatusOr<bool> AllFinite(const Tensor& t) {
  if (t.dtype() == DType::kF32 && t.buffer()->host_visible()) {
    const float* x = static_cast<const float*>(t.raw_data());
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      if (!std::isfinite(x[i])) return false;
    }
    return true;
  }
  ASSIGN_OR_RETURN(double s, SumSquares(t));
  return std::isfinite(s);
}

// In-place AllReduce of host doubles over a host (control-plane) communicator.
absl::Status AllReduceDoubles(comm::Communicator& host, std::vector<double>& values, comm::ReduceOp op) {
  ASSIGN_OR_RETURN(comm::Work w,
                   host.AllReduce(values.data(), values.data(), values.size(), DType::kF64, op));
  return w.Wait();
}

}  // namespace

bool CountsInGlobalNorm(const parallel::Parameter& p, const parallel::RankLayout& layout) {
  const bool tp_sharded = p.shard.tp_dim >= 0;
  if (!tp_sharded && layout.tp_rank != 0) return false;
  if (p.kind == parallel::ParamKind::kExpert) return layout.edp_rank == 0;
  return layout.dp_rank == 0;
}

absl::StatusOr<double> GlobalGradNorm(const parallel::ParameterList& params,
                                      const parallel::ProcessGroups& groups) {
  std::vector<Tensor> counted;
  for (const parallel::Parameter* p : params) {
    if (!CountsInGlobalNorm(*p, groups.layout)) continue;
    if (!p->grad.defined() || p->grad.dtype() != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat("gradient norm: parameter ", p->name, " has ",
                                                     p->grad.defined() ? p->grad.ToString() : "no gradient",
                                                     "; an f32 gradient is needed"));
    }
    counted.push_back(p->grad);
  }
  // Everything on the gradients' device, ordered on its default stream: one
  // partial sum of squares per counted tensor (each accumulated in double by
  // the kernel; one list op, so a few launches), their sum, the world
  // all-reduce (data plane, stream-ordered), and then the step's one small
  // host read of the result.
  const Device device = params.size() > 0 ? params[0]->grad.device() : groups.world->device();
  ASSIGN_OR_RETURN(Backend * backend, GetBackend(device));
  Stream& stream = backend->default_stream();
  const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(counted.size()));
  ASSIGN_OR_RETURN(Tensor parts, Tensor::ZerosOn(stream, Shape{n}, DType::kF32, MemoryCategory::kOther));
  ASSIGN_OR_RETURN(Tensor total, Tensor::Empty(*backend, Shape{1}, DType::kF32, MemoryCategory::kOther));
  if (!counted.empty()) RETURN_IF_ERROR(ops::ReduceSumSquares(stream, counted, parts));
  RETURN_IF_ERROR(ops::ReduceSum(stream, parts, total));
  comm::Communicator& world = *groups.world;
  // Stream-ordered on the gradients' device: a communicator of that device,
  // or one that stages its buffers through host memory (MPI with device
  // memory, host_staging.h).
  const bool on_device = world.device() == device || world.StagesDeviceBuffers();
  if (world.size() > 1 && on_device) {
    absl::Status st =
        world.AllReduce(total.raw_data(), total.raw_data(), 1, DType::kF32, comm::ReduceOp::kSum, stream);
    if (!st.ok()) return Annotate(st, "gradient norm all-reduce");
  }
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  ASSIGN_OR_RETURN(Tensor host, Tensor::Empty(*cpu, Shape{1}, DType::kF32, MemoryCategory::kOther));
  RETURN_IF_ERROR(ops::Copy(stream, total, host));
  absl::Status st = stream.Synchronize();  // the one host read of the step's norm
  if (!st.ok()) return Annotate(st, "gradient norm all-reduce");
  double sum = host.data<float>()[0];
  if (world.size() > 1 && !on_device) {
    // A communicator that can take neither the gradients' device buffers nor
    // stage them: the scalar is reduced on the host.
    ASSIGN_OR_RETURN(comm::Work w,
                     groups.host.world->AllReduce(&sum, &sum, 1, DType::kF64, comm::ReduceOp::kSum));
    st = w.Wait();
    if (!st.ok()) return Annotate(st, "gradient norm all-reduce");
  }
  return std::sqrt(sum);
}

double ClipCoefficient(double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm)) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

absl::StatusOr<double> ClipGradNorm(const parallel::ParameterList& params,
                                    const parallel::ProcessGroups& groups, double max_norm) {
  ASSIGN_OR_RETURN(double norm, GlobalGradNorm(params, groups));
  const double coeff = ClipCoefficient(norm, max_norm);
  if (coeff >= 1.0) return norm;
  // Enqueued on each gradient's stream; the optimizer's update follows there.
  for (const parallel::Parameter* p : params) {
    ASSIGN_OR_RETURN(Backend * backend, GetBackend(p->grad.device()));
    RETURN_IF_ERROR(ops::Scale(backend->default_stream(), p->grad, static_cast<float>(coeff), p->grad));
  }
  return norm;
}

absl::StatusOr<std::optional<std::string>> FirstNonFiniteTensor(
    const std::vector<std::pair<std::string, Tensor>>& tensors, comm::Communicator& world) {
  // The smallest list index with a non-finite element, min-reduced over the
  // world (size() = none). Doubles represent the indices exactly.
  std::vector<double> first{static_cast<double>(tensors.size())};
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].second.defined() || tensors[i].second.numel() == 0) continue;
    ASSIGN_OR_RETURN(bool finite, AllFinite(tensors[i].second));
    if (!finite) {
      first[0] = static_cast<double>(i);
      break;
    }
  }
  absl::Status st = AllReduceDoubles(world, first, comm::ReduceOp::kMin);
  if (!st.ok()) return Annotate(st, "non-finite check all-reduce");
  const size_t index = static_cast<size_t>(first[0]);
  if (index >= tensors.size()) return std::optional<std::string>();
  return std::optional<std::string>(tensors[index].first);
}

absl::StatusOr<std::optional<std::string>> FirstNonFiniteGrad(const parallel::ParameterList& params,
                                                              const parallel::ProcessGroups& groups) {
  std::vector<std::pair<std::string, Tensor>> grads;
  grads.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) grads.emplace_back(params[i]->name, params[i]->grad);
  return FirstNonFiniteTensor(grads, *groups.host.world);
}

}  // namespace moe::optim
