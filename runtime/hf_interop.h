// Hugging Face interop: a checkpoint's model as safetensors files with a
// config.json (moe-ckpt export-hf), and back (moe-ckpt import-hf). The tensor
// names and the config fields follow the Hugging Face family that matches the
// model's features (docs/hf_interop.md has the full mapping):
//
//   mixtral      softmax top-k with renormalised weights, every layer MoE, no
//                shared expert: block_sparse_moe.gate, experts.E.w1/w3/w2
//   qwen2_moe    softmax, a shared expert with its sigmoid gate, MoE every n-th
//                layer, or no top-k renormalisation: mlp.gate,
//                mlp.experts.E.gate_proj/up_proj/down_proj, mlp.shared_expert.*,
//                mlp.shared_expert_gate (and Qwen2's q/k/v biases, all zero)
//   deepseek_v3  sigmoid scores, the expert bias, group-limited routing or an
//                ungated shared expert: mlp.gate (+ e_score_correction_bias),
//                mlp.experts.E.*, mlp.shared_experts.* (attention keeps the
//                q/k/v/o_proj names: this runtime has no multi-head latent attention)
//
// A linear weight is [out, in] on both sides (the torch.nn.Linear convention),
// so no tensor is transposed; the stacked expert tensors [E, ...] are split into
// one tensor per expert. config.json also keeps the runtime's own model config
// ("moe_runtime_config") so that fields Hugging Face has no name for survive.
// With --train-state the export also writes moe_train_state.safetensors (the
// optimizer state under its checkpoint names, the train state and the full job
// config as metadata): then import gives back the checkpoint bit for bit.
#ifndef MOE_RUNTIME_HF_INTEROP_H_
#define MOE_RUNTIME_HF_INTEROP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/checkpoint_plan.h"
#include "runtime/core/config.pb.h"

namespace moe {

enum class HfFamily { kMixtral, kQwen2Moe, kDeepseekV3 };
const char* HfFamilyName(HfFamily family);  // "mixtral", "qwen2_moe", "deepseek_v3"

inline constexpr char kHfConfigFile[] = "config.json";
inline constexpr char kHfSingleFile[] = "model.safetensors";
inline constexpr char kHfIndexFile[] = "model.safetensors.index.json";
inline constexpr char kHfTrainStateFile[] = "moe_train_state.safetensors";

// A tensor of the runtime's checkpoint (docs/model.md): canonical name, global shape.
struct CanonicalTensor {
  std::string name;
  std::vector<int64_t> shape;
};
// The model's parameters and state (expert_bias) in docs/model.md order, for
// a resolved model config (every field set, as a checkpoint keeps it).
std::vector<CanonicalTensor> CanonicalModelTensors(const config::ModelConfig& model);

// One Hugging Face tensor: the elements [offset, offset + numel(hf_shape)) of
// canonical tensor `canonical` (row-major), or, when `canonical` is empty, a
// tensor the family has and this model does not (Qwen2-MoE's attention biases):
// written as zeros, and import accepts it only when it is all zeros.
struct HfTensor {
  std::string hf_name;
  std::vector<int64_t> hf_shape;
  std::string canonical;
  int64_t offset = 0;
  bool always_f32 = false;  // the expert bias (as DeepSeek-V3 keeps it)
};

// The family for this model, or InvalidArgument naming the feature that no
// family expresses (e.g. DeepSeek-V3 routing with MoE every second layer).
absl::StatusOr<HfFamily> ChooseHfFamily(const config::ModelConfig& model);
std::vector<HfTensor> HfTensors(const config::ModelConfig& model, HfFamily family);

struct HfExportOptions {
  std::string dtype = "F32";                     // "F32" or "BF16" (the expert bias stays F32)
  uint64_t max_shard_bytes = uint64_t{5} << 30;  // above it: model-0000i-of-0000N + index
  bool train_state = false;                      // also moe_train_state.safetensors
};
struct HfExportReport {
  HfFamily family = HfFamily::kMixtral;
  int64_t tensors = 0, bytes = 0;
  std::vector<std::string> files;
};
// Exports checkpoint directory `ckpt_dir` (a step_… directory) into `out_dir`,
// which must not exist or be empty. Everything is written into a temporary
// sibling directory first and renamed into place at the end, so a failure
// leaves no half export. Every tensor of the checkpoint is either exported or
// named in the error (optimizer state needs train_state).
absl::StatusOr<HfExportReport> ExportHf(const std::string& ckpt_dir, const std::string& out_dir,
                                        const HfExportOptions& options);

// What import-hf hands to the checkpoint writer. Without the train state: step
// 0, the data at its start, and a fresh (all-zero) state of the config's
// optimizer next to the model tensors.
struct HfImported {
  HfFamily family = HfFamily::kMixtral;
  TrainState state;         // step 0 unless the export carried the train state
  std::string config_text;  // the job config the checkpoint keeps
  bool with_train_state = false;
  std::vector<CanonicalTensor> shapes;   // every tensor, canonical names
  std::vector<std::vector<float>> data;  // their values, row-major
  std::vector<std::string> files;        // the files read
};
// Reads and checks a Hugging Face directory: config.json, the index (or the
// single file), every safetensors header (ParseSafetensorsHeader's checks),
// every tensor present once with the shape the config gives, no unknown
// tensor, and the train state file when present. Errors name the file, the
// tensor and the field (InvalidArgument for a mismatch with the config,
// DataLoss for a damaged file, NotFound for a missing one).
absl::StatusOr<HfImported> ReadHf(const std::string& hf_dir);

}  // namespace moe

#endif  // MOE_RUNTIME_HF_INTEROP_H_
