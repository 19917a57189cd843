// A SentencePiece processor behind libmoe_spm_shim.so (data/spm_shim/), which
// is dlopen()ed on first use: Debian's libsentencepiece carries its own
// protobuf-lite, whose exported symbols crash a process that also links
// libprotobuf, and <sentencepiece_processor.h> redefines absl::string_view.
// Neither reaches this side. Use data/spm_tokenizer.h instead.
#ifndef MOE_DATA_SPM_PROCESSOR_H_
#define MOE_DATA_SPM_PROCESSOR_H_

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace moe::data {

class SpmProcessor {
 public:
  SpmProcessor();
  ~SpmProcessor();
  SpmProcessor(const SpmProcessor&) = delete;
  SpmProcessor& operator=(const SpmProcessor&) = delete;
  // Each returns false and sets *error on failure (also when the shim cannot be loaded).
  bool Load(const std::string& path, std::string* error);
  bool Encode(const char* text, size_t size, std::vector<int>* ids, std::string* error) const;
  int piece_size() const;
  int eos_id() const;

 private:
  void* model_ = nullptr;  // the shim's model handle
};

}  // namespace moe::data

#endif  // MOE_DATA_SPM_PROCESSOR_H_
