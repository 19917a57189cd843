#include "optim/clip.h"

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

// In-place AllReduce of host doubles over `comm`, through a device buffer when
// the communicator needs one.
absl::Status AllReduceDoubles(comm::Communicator& comm, std::vector<double>& values, comm::ReduceOp op) {
  if (comm.device().is_cpu()) {
    ASSIGN_OR_RETURN(comm::Work w,
                     comm.AllReduce(values.data(), values.data(), values.size(), DType::kF64, op));
    return w.Wait();
  }
  ASSIGN_OR_RETURN(Backend * device, GetBackend(comm.device()));
  ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
  const Shape shape{static_cast<int64_t>(values.size())};
  const size_t nbytes = values.size() * sizeof(double);
  ASSIGN_OR_RETURN(Tensor dev, Tensor::FromHost(*device, shape, DType::kF64, values.data(), nbytes,
                                                MemoryCategory::kCommunication));
  ASSIGN_OR_RETURN(Tensor host, Tensor::Empty(*cpu, shape, DType::kF64, MemoryCategory::kOther));
  RETURN_IF_ERROR(device->default_stream().Synchronize());
  ASSIGN_OR_RETURN(comm::Work w,
                   comm.AllReduce(dev.raw_data(), dev.raw_data(), values.size(), DType::kF64, op));
  RETURN_IF_ERROR(w.Wait());
  RETURN_IF_ERROR(ops::Copy(device->default_stream(), dev, host));
  RETURN_IF_ERROR(device->default_stream().Synchronize());
  std::copy(host.data<double>(), host.data<double>() + values.size(), values.begin());
  return absl::OkStatus();
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
  std::vector<double> sum{0.0};
  for (const parallel::Parameter* p : params) {
    if (!CountsInGlobalNorm(*p, groups.layout)) continue;
    if (!p->grad.defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gradient norm: parameter ", p->name, " has no gradient"));
    }
    ASSIGN_OR_RETURN(double s, SumSquares(p->grad));
    sum[0] += s;
  }
  absl::Status st = AllReduceDoubles(*groups.world, sum, comm::ReduceOp::kSum);
  if (!st.ok()) return Annotate(st, "gradient norm all-reduce");
  return std::sqrt(sum[0]);
}

absl::StatusOr<double> ClipGradNorm(const parallel::ParameterList& params,
                                    const parallel::ProcessGroups& groups, double max_norm) {
  ASSIGN_OR_RETURN(double norm, GlobalGradNorm(params, groups));
  if (max_norm <= 0 || !std::isfinite(norm)) return norm;
  const double coeff = max_norm / (norm + 1e-6);
  if (coeff >= 1.0) return norm;
  Backend* last = nullptr;
  for (const parallel::Parameter* p : params) {
    ASSIGN_OR_RETURN(Backend * backend, GetBackend(p->grad.device()));
    RETURN_IF_ERROR(ops::Scale(backend->default_stream(), p->grad, static_cast<float>(coeff), p->grad));
    if (last != nullptr && last != backend) RETURN_IF_ERROR(last->default_stream().Synchronize());
    last = backend;
  }
  if (last != nullptr) RETURN_IF_ERROR(last->default_stream().Synchronize());
  return norm;
}

absl::StatusOr<std::optional<std::string>> FirstNonFiniteGrad(const parallel::ParameterList& params,
                                                              const parallel::ProcessGroups& groups) {
  // The smallest list index with a non-finite gradient, min-reduced over the
  // world (size() = none). Doubles represent the indices exactly.
  std::vector<double> first{static_cast<double>(params.size())};
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i]->grad.defined()) continue;
    ASSIGN_OR_RETURN(bool finite, AllFinite(params[i]->grad));
    if (!finite) {
      first[0] = static_cast<double>(i);
      break;
    }
  }
  absl::Status st = AllReduceDoubles(*groups.host.world, first, comm::ReduceOp::kMin);
  if (!st.ok()) return Annotate(st, "non-finite gradient check all-reduce");
  const size_t index = static_cast<size_t>(first[0]);
  if (index >= params.size()) return std::optional<std::string>();
  return std::optional<std::string>(params[index]->name);
}

}  // namespace moe::optim
