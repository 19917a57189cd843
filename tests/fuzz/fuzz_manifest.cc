// libFuzzer: a checkpoint's manifest.pb (the ManifestFile envelope, the
// Manifest inside, and the shard metadata checks that resume and verify run
// on it). Input: the bytes of manifest.pb.
#include <string>

#include "runtime/checkpoint_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto manifest = moe::ParseManifestFile(bytes, "fuzz/manifest.pb");
  if (!manifest.ok()) return 0;
  (void)moe::ValidateManifest(*manifest, "fuzz");
  return 0;
}
