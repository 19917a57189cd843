// Tensor: a typed, shaped, contiguous view into a shared device Buffer.
//
//   ASSIGN_OR_RETURN(Backend * cpu, GetBackend(Device::Cpu()));
//   ASSIGN_OR_RETURN(Tensor x, Tensor::Zeros(*cpu, {num_tokens, hidden_size},
//                                            DType::kF32, MemoryCategory::kActivations));
//   Tensor rows = x.Slice(10, 20);              // rows 10..19, no copy
//   ASSIGN_OR_RETURN(Tensor flat, x.View({num_tokens * hidden_size}));
//   float* p = x.data<float>();                 // CPU tensors only
//
// A Tensor is a handle (like a shared_ptr): copying it is cheap and shares the
// storage; the Buffer lives while any Tensor refers to it. Tensors are always
// row-major and contiguous; views are contiguous sub-ranges of a buffer, so
// every tensor is (buffer, byte offset, shape, dtype). Non-contiguous access
// (heads inside [B, S, H, hd], columns) is done by the ops, which take strides
// internally, never by strided tensors.
//
// Constness is that of the handle, not the data: ops write their outputs
// through `const Tensor&` (like a `T* const`), so views made on the fly
// (`x.Slice(a, b)`) can be passed as outputs.
#ifndef MOE_RUNTIME_CORE_TENSOR_H_
#define MOE_RUNTIME_CORE_TENSOR_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "runtime/core/check.h"
#include "runtime/core/dtype.h"
#include "runtime/core/memory.h"

namespace moe {

class Backend;
class Buffer;
class Stream;

inline constexpr int kMaxTensorDims = 5;

// Up to kMaxTensorDims int64 dimensions; rank 0 is a scalar (numel 1).
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(absl::Span<const int64_t> dims);

  int rank() const { return rank_; }
  // Dimension i; negative i counts from the end (-1 is the last).
  int64_t operator[](int i) const { return dims_[Index(i)]; }
  int64_t& operator[](int i) { return dims_[Index(i)]; }
  int64_t numel() const;
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + rank_; }
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string ToString() const;  // "[4,8]"

 private:
  int Index(int i) const {
    if (i < 0) i += rank_;
    MOE_CHECK(i >= 0 && i < rank_) << "dimension " << i << " of shape " << ToString();
    return i;
  }
  std::array<int64_t, kMaxTensorDims> dims_{};
  int rank_ = 0;
};

template <typename T>
constexpr DType DTypeOf();
template <>
constexpr DType DTypeOf<float>() {
  return DType::kF32;
}
template <>
constexpr DType DTypeOf<int32_t>() {
  return DType::kI32;
}
template <>
constexpr DType DTypeOf<int64_t>() {
  return DType::kI64;
}
template <>
constexpr DType DTypeOf<uint16_t>() {
  return DType::kBF16;
}  // bf16 bits
template <>
constexpr DType DTypeOf<uint8_t>() {
  return DType::kU8;
}
template <>
constexpr DType DTypeOf<double>() {
  return DType::kF64;
}

class Tensor {
 public:
  Tensor() = default;  // undefined: defined() is false

  // Uninitialised storage from `backend`'s default buffer type, attributed to
  // `category` in that device's memory accounting.
  static absl::StatusOr<Tensor> Empty(Backend& backend, Shape shape, DType dtype, MemoryCategory category);
  // Zero-filled (synchronously: the memory is zero when this returns; in
  // device memory a host wait, so a training step's path uses ZerosOn).
  static absl::StatusOr<Tensor> Zeros(Backend& backend, Shape shape, DType dtype, MemoryCategory category);
  // A tensor on `backend` holding a copy of `nbytes` host bytes (numel * dtype
  // size), there when this returns (in device memory a host wait: a step's
  // path uses FromHostOn).
  static absl::StatusOr<Tensor> FromHost(Backend& backend, Shape shape, DType dtype, const void* host_data,
                                         size_t nbytes, MemoryCategory category);
  // A tensor on `stream`'s device holding a copy of `nbytes` host bytes, for
  // work enqueued on `stream` after this call (other streams wait on an event
  // recorded after it). No host wait: device memory is filled in stream
  // order (Stream::CopyFromHost); `host_data` may be reused once it returns.
  static absl::StatusOr<Tensor> FromHostOn(Stream& stream, Shape shape, DType dtype, const void* host_data,
                                           size_t nbytes, MemoryCategory category);
  // Zero-filled in stream order on `stream` (no host wait), for work
  // enqueued on it after this call.
  static absl::StatusOr<Tensor> ZerosOn(Stream& stream, Shape shape, DType dtype, MemoryCategory category);
  // A tensor over an existing buffer at `byte_offset` (must fit in the buffer).
  static absl::StatusOr<Tensor> FromBuffer(std::shared_ptr<Buffer> buffer, size_t byte_offset, Shape shape,
                                           DType dtype);

  bool defined() const { return buffer_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  int64_t size(int dim) const { return shape_[dim]; }
  DType dtype() const { return dtype_; }
  Device device() const;
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  const std::shared_ptr<Buffer>& buffer() const { return buffer_; }
  size_t byte_offset() const { return offset_; }
  // "f32[4,8]@cpu".
  std::string ToString() const;

  // Address of the first element in the device's address space (a host pointer
  // on CPU). For backends and communicators; model code uses ops.
  void* raw_data() const;
  // Typed host access; checks that the tensor is on the CPU and of type T.
  template <typename T>
  T* data() const {
    MOE_CHECK(defined() && dtype_ == DTypeOf<T>() && device().is_cpu())
        << "data<" << DTypeName(DTypeOf<T>()) << ">() on " << ToString();
    return static_cast<T*>(raw_data());
  }

  // Views (no copy; share the buffer). Out-of-range arguments are programmer
  // errors (MOE_CHECK).
  // Rows [begin, end) along dimension 0.
  Tensor Slice(int64_t begin, int64_t end) const;
  // Index i along dimension 0, dropping that dimension.
  Tensor Select(int64_t i) const;
  // Same elements, new shape (numel must match; one dimension may be -1).
  absl::StatusOr<Tensor> View(Shape shape) const;
  // Like View, but a mismatch is a programmer error.
  Tensor Reshape(Shape shape) const;
  // All leading dimensions merged: [a, b, c] -> [a * b, c]. Rank 1 -> [1, n].
  Tensor Flatten2D() const;

  // Do `this` and `other` view overlapping bytes of the same buffer?
  bool Overlaps(const Tensor& other) const;

 private:
  std::shared_ptr<Buffer> buffer_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::kF32;
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_TENSOR_H_
