// Element types and devices, shared by tensors, communicators and files.
#ifndef MOE_RUNTIME_CORE_DTYPE_H_
#define MOE_RUNTIME_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kI32 = 2, kI64 = 3, kU8 = 4, kF64 = 5 };

inline size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU8:
      return 1;
    case DType::kF64:
      return 8;
  }
  return 0;
}

const char* DTypeName(DType t);  // "f32", "bf16", ...

enum class DeviceKind : uint8_t { kCpu = 0, kCuda = 1 };

struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;
  static Device Cpu() { return {DeviceKind::kCpu, 0}; }
  static Device Cuda(int i) { return {DeviceKind::kCuda, i}; }
  bool is_cpu() const { return kind == DeviceKind::kCpu; }
  bool operator==(const Device& o) const {
    return kind == o.kind && (kind == DeviceKind::kCpu || index == o.index);
  }
  std::string ToString() const;  // "cpu", "cuda:0"
};

}  // namespace moe

#endif  // MOE_RUNTIME_CORE_DTYPE_H_
