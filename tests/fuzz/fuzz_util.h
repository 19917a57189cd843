// Helpers of the libFuzzer harnesses (tests/fuzz/README.md): a private
// scratch directory per fuzzing process, and writing bytes to a file there.
#ifndef MOE_TESTS_FUZZ_FUZZ_UTIL_H_
#define MOE_TESTS_FUZZ_FUZZ_UTIL_H_

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace moe::fuzz {

inline const std::string& ScratchDir() {
  static const std::string dir = [] {
    const std::string d =
        (std::filesystem::temp_directory_path() / ("moe_fuzz_" + std::to_string(::getpid()))).string();
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

inline std::string WriteScratch(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = ScratchDir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace moe::fuzz

#endif  // MOE_TESTS_FUZZ_FUZZ_UTIL_H_
