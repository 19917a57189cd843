// libmoe_spm_shim.so: the only code linked against libsentencepiece. Debian's
// libsentencepiece exports its own copy of protobuf-lite, whose symbols clash
// with libprotobuf (the config and checkpoint protos): loaded together, the
// process crashes at start-up. So data/spm_processor.cc dlopen()s this module
// with RTLD_LOCAL | RTLD_DEEPBIND when a SentencePiece model is first used:
// SentencePiece then resolves against its own protobuf, and the rest of the
// process never sees it. A plain C interface crosses the boundary.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

void SetError(const std::string& message, char* error, size_t error_size) {
  if (error_size == 0) return;
  std::strncpy(error, message.c_str(), error_size - 1);
  error[error_size - 1] = '\0';
}

}  // namespace

extern "C" {

// A loaded model, or null with *error set.
void* moe_spm_load(const char* path, char* error, size_t error_size) {
  auto* p = new sentencepiece::SentencePieceProcessor();
  const auto status = p->Load(path);
  if (!status.ok()) {
    SetError(status.ToString(), error, error_size);
    delete p;
    return nullptr;
  }
  return p;
}

void moe_spm_free(void* model) { delete static_cast<sentencepiece::SentencePieceProcessor*>(model); }

int moe_spm_piece_size(const void* model) {
  return static_cast<const sentencepiece::SentencePieceProcessor*>(model)->GetPieceSize();
}

int moe_spm_eos_id(const void* model) {
  return static_cast<const sentencepiece::SentencePieceProcessor*>(model)->eos_id();
}

// Encodes text[0, size) into *ids (malloc'ed, *count values; free with
// moe_spm_free_ids). Returns 0, or -1 with *error set. Thread-safe.
int moe_spm_encode(const void* model, const char* text, size_t size, int** ids, size_t* count, char* error,
                   size_t error_size) {
  std::vector<int> out;
  const auto status = static_cast<const sentencepiece::SentencePieceProcessor*>(model)->Encode(
      std::string_view(text, size), &out);
  if (!status.ok()) {
    SetError(status.ToString(), error, error_size);
    return -1;
  }
  *count = out.size();
  *ids = static_cast<int*>(std::malloc(std::max<size_t>(out.size(), 1) * sizeof(int)));
  if (*ids == nullptr) {
    SetError("out of memory", error, error_size);
    return -1;
  }
  std::memcpy(*ids, out.data(), out.size() * sizeof(int));
  return 0;
}

void moe_spm_free_ids(int* ids) { std::free(ids); }

}  // extern "C"
