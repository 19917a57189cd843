#include "runtime/core/tensor.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/core/backend.h"
#include "runtime/core/ops.h"
#include "runtime/core/status.h"

namespace moe {

Shape::Shape(std::initializer_list<int64_t> dims)
    : Shape(absl::Span<const int64_t>(dims.begin(), dims.size())) {}

Shape::Shape(absl::Span<const int64_t> dims) {
  MOE_CHECK(dims.size() <= kMaxTensorDims) << "shape of rank " << dims.size();
  rank_ = static_cast<int>(dims.size());
  for (int i = 0; i < rank_; ++i) dims_[i] = dims[i];
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= dims_[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

std::string Shape::ToString() const { return absl::StrCat("[", absl::StrJoin(*this, ","), "]"); }

namespace {

absl::Status CheckShape(const Shape& shape) {
  for (int64_t d : shape)
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("tensor shape ", shape.ToString(), " has a negative dimension"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Tensor> Tensor::Empty(Backend& backend, Shape shape, DType dtype, MemoryCategory category) {
  RETURN_IF_ERROR(CheckShape(shape));
  size_t bytes = static_cast<size_t>(shape.numel()) * DTypeSize(dtype);
  ASSIGN_OR_RETURN(std::shared_ptr<Buffer> buffer, backend.default_buffer_type().Allocate(bytes, category));
  return FromBuffer(std::move(buffer), 0, shape, dtype);
}

absl::StatusOr<Tensor> Tensor::Zeros(Backend& backend, Shape shape, DType dtype, MemoryCategory category) {
  ASSIGN_OR_RETURN(Tensor t, Empty(backend, shape, dtype, category));
  if (t.buffer()->host_visible()) {
    std::memset(t.raw_data(), 0, t.nbytes());
    return t;
  }
  // Device memory: a fill on the device's default stream, waited for here.
  RETURN_IF_ERROR(ops::Fill(backend.default_stream(), t, 0.0));
  RETURN_IF_ERROR(backend.default_stream().Synchronize());
  return t;
}

absl::StatusOr<Tensor> Tensor::FromHost(Backend& backend, Shape shape, DType dtype, const void* host_data,
                                        size_t nbytes, MemoryCategory category) {
  ASSIGN_OR_RETURN(Tensor t, Empty(backend, shape, dtype, category));
  if (nbytes != t.nbytes())
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::FromHost: nbytes = ", nbytes, " but ", t.ToString(), " needs ", t.nbytes()));
  if (nbytes == 0) return t;
  if (!t.buffer()->host_visible()) {
    // Device memory: a host-to-device copy on the device's default stream, waited for here.
    ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
    ASSIGN_OR_RETURN(Tensor host, FromHost(*cpu, shape, dtype, host_data, nbytes, MemoryCategory::kOther));
    RETURN_IF_ERROR(ops::Copy(backend.default_stream(), host, t));
    RETURN_IF_ERROR(backend.default_stream().Synchronize());
    return t;
  }
  std::memcpy(t.raw_data(), host_data, nbytes);
  return t;
}

absl::StatusOr<Tensor> Tensor::FromHostOn(Stream& stream, Shape shape, DType dtype, const void* host_data,
                                          size_t nbytes, MemoryCategory category) {
  ASSIGN_OR_RETURN(Tensor t, Empty(stream.backend(), shape, dtype, category));
  if (nbytes != t.nbytes())
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::FromHostOn: nbytes = ", nbytes, " but ", t.ToString(), " needs ", t.nbytes()));
  if (nbytes == 0) return t;
  if (t.buffer()->host_visible()) {
    std::memcpy(t.raw_data(), host_data, nbytes);  // fresh memory: no stream uses it yet
    return t;
  }
  RETURN_IF_ERROR(stream.CopyFromHost(t.raw_data(), host_data, nbytes));
  return t;
}

absl::StatusOr<Tensor> Tensor::ZerosOn(Stream& stream, Shape shape, DType dtype, MemoryCategory category) {
  ASSIGN_OR_RETURN(Tensor t, Empty(stream.backend(), shape, dtype, category));
  if (t.buffer()->host_visible()) {
    std::memset(t.raw_data(), 0, t.nbytes());
    return t;
  }
  RETURN_IF_ERROR(ops::Fill(stream, t, 0.0));
  return t;
}

absl::StatusOr<Tensor> Tensor::FromBuffer(std::shared_ptr<Buffer> buffer, size_t byte_offset, Shape shape,
                                          DType dtype) {
  if (buffer == nullptr) return absl::InvalidArgumentError("Tensor::FromBuffer: null buffer");
  RETURN_IF_ERROR(CheckShape(shape));
  size_t bytes = static_cast<size_t>(shape.numel()) * DTypeSize(dtype);
  if (byte_offset + bytes > buffer->size())
    return absl::InvalidArgumentError(
        absl::StrCat("Tensor::FromBuffer: ", DTypeName(dtype), shape.ToString(), " at byte offset ",
                     byte_offset, " does not fit in a buffer of ", buffer->size(), " bytes"));
  Tensor t;
  t.buffer_ = std::move(buffer);
  t.offset_ = byte_offset;
  t.shape_ = shape;
  t.dtype_ = dtype;
  return t;
}

Device Tensor::device() const { return buffer_ ? buffer_->device() : Device::Cpu(); }

std::string Tensor::ToString() const {
  if (!defined()) return "undefined";
  return absl::StrCat(DTypeName(dtype_), shape_.ToString(), "@", device().ToString());
}

void* Tensor::raw_data() const {
  MOE_CHECK(defined()) << "raw_data() of an undefined tensor";
  return static_cast<char*>(buffer_->data()) + offset_;
}

Tensor Tensor::Slice(int64_t begin, int64_t end) const {
  MOE_CHECK(defined() && rank() >= 1 && 0 <= begin && begin <= end && end <= size(0))
      << "Slice(" << begin << ", " << end << ") of " << ToString();
  Tensor t = *this;
  int64_t row = numel() / std::max<int64_t>(size(0), 1);
  t.shape_[0] = end - begin;
  t.offset_ += static_cast<size_t>(begin * row) * DTypeSize(dtype_);
  return t;
}

Tensor Tensor::Select(int64_t i) const {
  MOE_CHECK(defined() && rank() >= 1 && 0 <= i && i < size(0)) << "Select(" << i << ") of " << ToString();
  Tensor t = Slice(i, i + 1);
  t.shape_ = Shape(absl::Span<const int64_t>(shape_.begin() + 1, rank() - 1));
  return t;
}

absl::StatusOr<Tensor> Tensor::View(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < shape.rank(); ++i) {
    if (shape[i] == -1 && infer < 0) {
      infer = i;
    } else if (shape[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("View", shape.ToString(), " of ", ToString(), ": bad dimension"));
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel() % known != 0)
      return absl::InvalidArgumentError(
          absl::StrCat("View", shape.ToString(), " of ", ToString(), ": cannot infer the -1 dimension"));
    shape[infer] = numel() / known;
  }
  if (shape.numel() != numel())
    return absl::InvalidArgumentError(
        absl::StrCat("View", shape.ToString(), " of ", ToString(), ": element counts differ"));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::Reshape(Shape shape) const {
  absl::StatusOr<Tensor> t = View(shape);
  MOE_CHECK(t.ok()) << t.status().message();
  return *std::move(t);
}

Tensor Tensor::Flatten2D() const {
  MOE_CHECK(defined() && rank() >= 1) << "Flatten2D of " << ToString();
  int64_t rows = 1;
  for (int i = 0; i + 1 < rank(); ++i) rows *= size(i);
  Tensor t = *this;
  t.shape_ = Shape({rows, size(-1)});
  return t;
}

bool Tensor::Overlaps(const Tensor& other) const {
  if (!defined() || !other.defined() || buffer_->data() != other.buffer_->data()) return false;
  size_t a0 = offset_, a1 = offset_ + nbytes();
  size_t b0 = other.offset_, b1 = other.offset_ + other.nbytes();
  return a0 < b1 && b0 < a1;
}

}  // namespace moe
