// The safetensors reader and writer (runtime/safetensors.h) and the Hugging
// Face name mapping (runtime/hf_interop.h) on their own: a written file reads
// back bit for bit (F32) or rounded to nearest even (BF16); every malformed
// header is refused naming the file and the tensor; the mapping covers every
// canonical tensor exactly once per family. The end-to-end export/import runs
// in tests/launch/hf_interop_test.sh.
#include "runtime/safetensors.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/core/config.h"
#include "runtime/hf_interop.h"

namespace moe {
namespace {

std::string TempFile(const std::string& name) {
  return (std::filesystem::temp_directory_path() / absl::StrCat("moe_st_", name, "_", ::getpid())).string();
}

// The error message of parsing `json` with a data section of `data_bytes`.
std::string HeaderError(const std::string& json, uint64_t data_bytes = 64) {
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(json, data_bytes, "f.safetensors");
  return h.ok() ? "OK" : std::string(h.status().message());
}

TEST_CASE("a written file reads back: F32 bit for bit, BF16 rounded to nearest even") {
  const std::string path = TempFile("rt");
  std::vector<float> a = {1.0f, -2.5f, 3.14159274f, 1e-30f, -0.0f, 65504.0f};
  std::vector<float> b = {1.00390625f, 1.01171875f};  // halfway between bf16 values: to even
  const std::vector<SafetensorsTensorOut> out = {{"a", "F32", {2, 3}, a.data()},
                                                 {"b", "BF16", {2}, b.data()}};
  REQUIRE(WriteSafetensors(path, out, {{"format", "pt"}}).ok());
  absl::StatusOr<SafetensorsReader> r = SafetensorsReader::Open(path);
  REQUIRE(r.ok());
  CHECK(r->header().Metadata("format") == "pt");
  CHECK(r->header().data_start % 8 == 0);
  const SafetensorsEntry* ea = r->header().Find("a");
  REQUIRE(ea != nullptr);
  CHECK(ea->shape == std::vector<int64_t>{2, 3});
  absl::StatusOr<std::vector<float>> va = r->ReadF32(*ea);
  REQUIRE(va.ok());
  CHECK(std::memcmp(va->data(), a.data(), a.size() * 4) == 0);
  absl::StatusOr<std::vector<float>> vb = r->ReadF32(*r->header().Find("b"));
  REQUIRE(vb.ok());
  CHECK((*vb)[0] == 1.0f);       // 1 + 2^-8 is halfway: rounds to the even 1.0
  CHECK((*vb)[1] == 1.015625f);  // 1 + 3 * 2^-8 is halfway: rounds up to the even 1 + 4 * 2^-8
  std::filesystem::remove(path);
}

TEST_CASE("F16 tensors widen to f32 exactly: normal, subnormal, largest, infinity") {
  const std::string path = TempFile("f16");
  const std::string json = R"({"h":{"dtype":"F16","shape":[6],"data_offsets":[0,12]}})";
  const uint16_t halves[6] = {0x3C00, 0xC000, 0x0001, 0x7BFF, 0x7C00, 0x8000};
  FILE* f = std::fopen(path.c_str(), "wb");
  unsigned char len[8] = {static_cast<unsigned char>(json.size()), 0, 0, 0, 0, 0, 0, 0};
  std::fwrite(len, 1, 8, f);
  std::fwrite(json.data(), 1, json.size(), f);
  for (uint16_t h : halves) {
    const unsigned char b[2] = {static_cast<unsigned char>(h & 0xff), static_cast<unsigned char>(h >> 8)};
    std::fwrite(b, 1, 2, f);
  }
  std::fclose(f);
  absl::StatusOr<SafetensorsReader> r = SafetensorsReader::Open(path);
  REQUIRE(r.ok());
  absl::StatusOr<std::vector<float>> v = r->ReadF32(r->header().tensors[0]);
  REQUIRE(v.ok());
  CHECK((*v)[0] == 1.0f);
  CHECK((*v)[1] == -2.0f);
  CHECK((*v)[2] == std::ldexp(1.0f, -24));
  CHECK((*v)[3] == 65504.0f);
  CHECK(std::isinf((*v)[4]));
  CHECK(((*v)[5] == 0.0f && std::signbit((*v)[5])));
  std::filesystem::remove(path);
}

TEST_CASE("malformed headers are refused, naming the tensor and the problem") {
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})") == "OK");
  CHECK(HeaderError("[1]").find("not a JSON object") != std::string::npos);
  CHECK(HeaderError("{").find("not valid JSON") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})")
            .find("tensor \"t\": data_offsets [0, 12) hold 12 bytes") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]}})")
            .find("tensor \"t\": shape has a value that is not a count") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,16]}})").find("not a count") !=
        std::string::npos);
  CHECK(
      HeaderError(R"({"t":{"dtype":"X9","shape":[1],"data_offsets":[0,4]}})").find("unknown dtype \"X9\"") !=
      std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})").find("BEGIN <= END") !=
        std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}})", 64)
            .find("end past the data") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})")
            .find("tensors \"t\" [0, 8) and \"u\" [4, 12) overlap") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                    R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})")
            .find("listed twice") != std::string::npos);
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[1048576,1048576,1048576],"data_offsets":[0,4]}})")
            .find("too many elements") != std::string::npos);
  CHECK(HeaderError(R"({"__metadata__":{"k":1}})").find("__metadata__ value of \"k\"") != std::string::npos);
  // Zero-sized tensors may share an offset.
  CHECK(HeaderError(R"({"t":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},)"
                    R"("u":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})") == "OK");
}

TEST_CASE("a file shorter than its header length, or with a huge one, is refused") {
  const std::string path = TempFile("short");
  FILE* f = std::fopen(path.c_str(), "wb");
  const unsigned char len[8] = {0x00, 0x10, 0, 0, 0, 0, 0, 0};  // 4096
  std::fwrite(len, 1, 8, f);
  std::fputs("{}", f);
  std::fclose(f);
  absl::StatusOr<SafetensorsReader> r = SafetensorsReader::Open(path);
  REQUIRE(!r.ok());
  CHECK(std::string(r.status().message()).find("runs past the end of the file") != std::string::npos);
  CHECK(std::string(r.status().message()).find(path) != std::string::npos);
  std::filesystem::remove(path);
  CHECK(!SafetensorsReader::Open(path).ok());  // missing
}

TEST_CASE("every family maps each canonical tensor element exactly once") {
  struct Case {
    const char* overrides;
    HfFamily family;
  };
  const std::vector<Case> cases = {
      {"", HfFamily::kMixtral},
      {"model.moe.moe_layer_freq=2", HfFamily::kQwen2Moe},
      {"model.moe.shared_expert_ffn_hidden_size=32 model.moe.shared_expert_gate=true", HfFamily::kQwen2Moe},
      {"model.moe.score_function=sigmoid model.moe.expert_bias_update_rate=0.001 "
       "model.moe.shared_expert_ffn_hidden_size=64",
       HfFamily::kDeepseekV3},
  };
  for (const Case& c : cases) {
    JobConfig job;
    std::vector<std::string> ov;
    for (absl::string_view s : absl::StrSplit(c.overrides, ' ', absl::SkipEmpty())) ov.emplace_back(s);
    ov.push_back("model.moe.expert_ffn_hidden_size=32");
    REQUIRE(ApplyOverrides(ov, &job).ok());
    ApplyDefaults(1, &job);
    absl::StatusOr<HfFamily> family = ChooseHfFamily(job.model());
    REQUIRE(family.ok());
    CHECK(*family == c.family);
    std::map<std::string, int64_t> covered;
    for (const HfTensor& t : HfTensors(job.model(), *family)) {
      int64_t n = 1;
      for (int64_t d : t.hf_shape) n *= d;
      if (!t.canonical.empty()) covered[t.canonical] += n;
    }
    for (const CanonicalTensor& t : CanonicalModelTensors(job.model())) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      INFO(c.overrides << ": " << t.name);
      CHECK(covered[t.name] == n);
    }
  }
  // No family for DeepSeek routing with MoE every second layer.
  JobConfig job;
  REQUIRE(ApplyOverrides({"model.moe.score_function=sigmoid", "model.moe.moe_layer_freq=2"}, &job).ok());
  ApplyDefaults(1, &job);
  absl::StatusOr<HfFamily> none = ChooseHfFamily(job.model());
  REQUIRE(!none.ok());
  CHECK(std::string(none.status().message()).find("model.moe.moe_layer_freq = 2") != std::string::npos);
}

}  // namespace
}  // namespace moe
