// Cutting a token stream into training samples and global batches.
//
// Samples. A split of the stream is `num_samples` samples of seq_len + 1 tokens
// with stride seq_len: sample k is tokens [first_token + k*seq_len,
// first_token + k*seq_len + seq_len + 1) (inputs are its first seq_len tokens,
// targets its last seq_len). A stream of T tokens holds (T - 1) / seq_len samples.
//
// Epoch order. With shuffle, epoch e visits the samples in the order of
// ShufflePermutation(num_samples, seed, e); without, in stream order.
//
// Global batches (docs/model.md, "Loss, micro-batches and the global batch"). global_batch = dp * micro_batch
// * grad_accum samples, taken in epoch order: the batch at state (epoch, position) is order positions
// [position, position + global_batch). Micro-batch m = a*dp + r (accumulation step a, data-parallel rank r)
// holds the batch's samples [m*micro_batch, (m+1)*micro_batch). So (dp = 2, grad_accum = 1) and (dp = 1,
// grad_accum = 2) see the same micro-batches. When fewer than global_batch samples
// are left in an epoch, they are skipped and the next epoch starts (position 0).
//
// Worked example: 10 samples, shuffle off, dp 2, micro_batch 2, grad_accum 1:
// step 0 = samples {0,1 | 2,3} (rank 0 | rank 1), step 1 = {4,5 | 6,7}, step 2 wraps:
// samples 8, 9 are not enough for a batch of 4, so step 2 is epoch 1, {0,1 | 2,3}.
#ifndef MOE_DATA_SAMPLER_H_
#define MOE_DATA_SAMPLER_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/token_source.h"

namespace moe::data {

// Where the sampler stands: the next global batch is epoch `epoch`, order
// positions [position, position + global_batch). Saved in checkpoints as two
// integers.
struct SamplerState {
  int64_t epoch = 0;
  int64_t position = 0;

  std::array<int64_t, 2> ToInts() const { return {epoch, position}; }
  static SamplerState FromInts(const std::array<int64_t, 2>& v) { return {v[0], v[1]}; }
  bool operator==(const SamplerState& o) const { return epoch == o.epoch && position == o.position; }
};

// A fully specified, platform-independent permutation of [0, n):
//   SplitMix64 stream:  s = Mix(seed ^ Mix(epoch)); next() { s += 0x9E3779B97F4A7C15; return Mix(s); }
//   Mix(z): z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB; z ^ z>>31
//           (all uint64 arithmetic modulo 2^64)
//   Uniform(b): t = (2^64 - b) mod b; draw r = next() until r >= t; return r mod b
//   Fisher-Yates: p = [0, 1, ..., n-1]; for i = n-1 down to 1: swap(p[i], p[Uniform(i+1)])
std::vector<int64_t> ShufflePermutation(int64_t n, uint64_t seed, int64_t epoch);

struct SamplerOptions {
  int64_t seq_len = 128;
  int64_t micro_batch = 4;
  int64_t dp = 1;
  int64_t grad_accum = 1;
  bool shuffle = true;
  uint64_t seed = 1234;
  // Training split: must hold at least one global batch. An evaluation split
  // needs only one sample (eval batches wrap around).
  bool training = true;
  std::string name = "train";  // for messages: "train", "valid"
};

class Sampler {
 public:
  // The samples [first_sample, first_sample + num_samples) of `source`'s stream
  // (sample k as above, with first_token = first_sample * seq_len). Errors name
  // the numbers: too few tokens for one global batch (training) or one sample.
  static absl::StatusOr<std::unique_ptr<Sampler>> Create(std::shared_ptr<const TokenSource> source,
                                                         int64_t first_sample, int64_t num_samples,
                                                         const SamplerOptions& options);

  int64_t num_samples() const { return num_samples_; }
  int64_t seq_len() const { return options_.seq_len; }
  int64_t micro_batch() const { return options_.micro_batch; }
  int64_t global_batch() const { return options_.dp * options_.micro_batch * options_.grad_accum; }
  int64_t batches_per_epoch() const { return num_samples_ / global_batch(); }
  const SamplerOptions& options() const { return options_; }
  const TokenSource& source() const { return *source_; }

  // Training: the state of the next global batch; Advance() moves to the one
  // after it (wrapping to the next epoch as described above).
  const SamplerState& state() const { return state_; }
  void Advance();
  // Resumes at a saved state. A position past the last full batch of its epoch
  // moves to the next epoch, as Advance() would. Error: negative values.
  absl::Status Restore(const SamplerState& state);
  // The state after `step` Advance()s from {0, 0}: a pure function of the step.
  SamplerState StateAtStep(int64_t step) const;

  // Sample ids of micro-batch (accum_step, dp_rank) of the current global batch.
  std::vector<int64_t> MicroBatchSamples(int64_t accum_step, int64_t dp_rank) const;
  // Its tokens: micro_batch rows of seq_len + 1 token ids, row-major, into
  // out[0 .. micro_batch * (seq_len + 1)). Safe to call from several threads
  // when the source's Read is (Megatron: yes; HDF5: no).
  absl::Status MicroBatch(int64_t accum_step, int64_t dp_rank, int32_t* out) const;

  // Evaluation (stream order, no shuffle, no state). Eval batch b is the
  // global_batch() samples [b * global_batch, (b + 1) * global_batch) mod
  // num_samples, split like a training batch: micro-batch (accum_step a,
  // dp rank r) gets positions (a*dp + r)*micro_batch + i, i < micro_batch. So
  // eval batches [0, n) are the first n * global_batch samples of the split on
  // every layout with that global batch (validation loss is layout-invariant,
  // like the training loss). Batches [0, num_eval_batches()) are disjoint;
  // later ones wrap around.
  int64_t num_eval_batches() const;
  std::vector<int64_t> EvalMicroBatchSamples(int64_t batch, int64_t accum_step, int64_t dp_rank) const;
  absl::Status EvalMicroBatch(int64_t batch, int64_t accum_step, int64_t dp_rank, int32_t* out) const;

  // Reads sample `sample` (seq_len + 1 tokens) into out.
  absl::Status ReadSample(int64_t sample, int32_t* out) const;

 private:
  Sampler() = default;
  void LoadEpoch();  // order_ for state_.epoch
  absl::Status ReadSamples(const std::vector<int64_t>& samples, int32_t* out) const;

  std::shared_ptr<const TokenSource> source_;
  SamplerOptions options_;
  int64_t first_sample_ = 0;
  int64_t num_samples_ = 0;
  SamplerState state_;
  std::vector<int64_t> order_;  // epoch order when shuffling (empty otherwise)
};

}  // namespace moe::data

#endif  // MOE_DATA_SAMPLER_H_
