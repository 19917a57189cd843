#include "data/spm_processor.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace moe::data {
namespace {

// The shim's C interface (data/spm_shim/spm_shim.cc).
struct Shim {
  void* (*load)(const char*, char*, size_t) = nullptr;
  void (*free_model)(void*) = nullptr;
  int (*piece_size)(const void*) = nullptr;
  int (*eos_id)(const void*) = nullptr;
  int (*encode)(const void*, const char*, size_t, int**, size_t*, char*, size_t) = nullptr;
  void (*free_ids)(int*) = nullptr;
  std::string error;  // why it could not be loaded
};

std::string ExecutableDir() {
  char buf[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

// Loaded once: $MOE_SPM_SHIM, else next to the executable, else the build's copy.
const Shim& GetShim() {
  static Shim shim;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("MOE_SPM_SHIM")) candidates.push_back(env);
    candidates.push_back(ExecutableDir() + "/libmoe_spm_shim.so");
    candidates.push_back(MOE_SPM_SHIM_PATH);
    void* handle = nullptr;
    std::string tried;
    for (const std::string& path : candidates) {
      handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle != nullptr) break;
      const char* why = dlerror();
      tried += "\n  " + path + ": " + (why ? why : "not found");
    }
    if (handle == nullptr) {
      shim.error =
          "cannot load libmoe_spm_shim.so (the SentencePiece module, built with moe-preprocess; "
          "needs libsentencepiece0) from:" +
          tried;
      return;
    }
    shim.load = reinterpret_cast<decltype(shim.load)>(dlsym(handle, "moe_spm_load"));
    shim.free_model = reinterpret_cast<decltype(shim.free_model)>(dlsym(handle, "moe_spm_free"));
    shim.piece_size = reinterpret_cast<decltype(shim.piece_size)>(dlsym(handle, "moe_spm_piece_size"));
    shim.eos_id = reinterpret_cast<decltype(shim.eos_id)>(dlsym(handle, "moe_spm_eos_id"));
    shim.encode = reinterpret_cast<decltype(shim.encode)>(dlsym(handle, "moe_spm_encode"));
    shim.free_ids = reinterpret_cast<decltype(shim.free_ids)>(dlsym(handle, "moe_spm_free_ids"));
    if (!shim.load || !shim.free_model || !shim.piece_size || !shim.eos_id || !shim.encode ||
        !shim.free_ids) {
      shim.load = nullptr;
      shim.error = "libmoe_spm_shim.so lacks a moe_spm_* function (a stale build?)";
    }
  });
  return shim;
}

}  // namespace

SpmProcessor::SpmProcessor() = default;

SpmProcessor::~SpmProcessor() {
  if (model_ != nullptr) GetShim().free_model(model_);
}

bool SpmProcessor::Load(const std::string& path, std::string* error) {
  const Shim& shim = GetShim();
  if (shim.load == nullptr) {
    *error = shim.error;
    return false;
  }
  char buf[1024] = {0};
  model_ = shim.load(path.c_str(), buf, sizeof(buf));
  if (model_ == nullptr) *error = buf;
  return model_ != nullptr;
}

bool SpmProcessor::Encode(const char* text, size_t size, std::vector<int>* ids, std::string* error) const {
  const Shim& shim = GetShim();
  int* out = nullptr;
  size_t count = 0;
  char buf[1024] = {0};
  if (shim.encode(model_, text, size, &out, &count, buf, sizeof(buf)) != 0) {
    *error = buf;
    return false;
  }
  ids->assign(out, out + count);
  shim.free_ids(out);
  return true;
}

int SpmProcessor::piece_size() const { return GetShim().piece_size(model_); }
int SpmProcessor::eos_id() const { return GetShim().eos_id(model_); }

}  // namespace moe::data
