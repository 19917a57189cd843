#include "data/sampler.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/core/status.h"

namespace moe::data {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  SplitMix64(uint64_t seed, uint64_t epoch) : s_(Mix(seed ^ Mix(epoch))) {}
  uint64_t Next() {
    s_ += kGolden;
    return Mix(s_);
  }
  // Unbiased integer in [0, bound), bound >= 1.
  uint64_t Uniform(uint64_t bound) {
    const uint64_t threshold = (0 - bound) % bound;
    while (true) {
      const uint64_t r = Next();
      if (r >= threshold) return r % bound;
    }
  }

 private:
  uint64_t s_;
};

}  // namespace

std::vector<int64_t> ShufflePermutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  SplitMix64 rng(seed, static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i >= 1; --i) {
    const int64_t j = static_cast<int64_t>(rng.Uniform(static_cast<uint64_t>(i) + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

absl::StatusOr<std::unique_ptr<Sampler>> Sampler::Create(std::shared_ptr<const TokenSource> source,
                                                         int64_t first_sample, int64_t num_samples,
                                                         const SamplerOptions& o) {
  if (o.seq_len < 1 || o.micro_batch < 1 || o.dp < 1 || o.grad_accum < 1) {
    return absl::InvalidArgumentError(absl::StrCat(o.name, " sampler: seq_len = ", o.seq_len,
                                                   ", micro_batch = ", o.micro_batch, ", dp = ", o.dp,
                                                   ", grad_accum = ", o.grad_accum, "; each must be >= 1"));
  }
  const int64_t t = source->num_tokens();
  const int64_t global_batch = o.dp * o.micro_batch * o.grad_accum;
  if (first_sample < 0 || num_samples < 0 ||
      (num_samples > 0 && (first_sample + num_samples) * o.seq_len + 1 > t)) {
    return absl::InvalidArgumentError(absl::StrCat(
        o.name, " sampler: samples [", first_sample, ", ", first_sample + num_samples, ") of seq_len + 1 = ",
        o.seq_len + 1, " tokens do not fit ", source->Describe(), " (", t, " tokens)"));
  }
  if (num_samples < 1 || (o.training && num_samples < global_batch)) {
    const int64_t need = o.training ? global_batch : 1;
    return absl::InvalidArgumentError(absl::StrCat(
        "not enough ", o.name, " data in ", source->Describe(), ": ", t, " tokens, of which ", num_samples,
        " samples of seq_len + 1 = ", o.seq_len + 1, " tokens (stride ", o.seq_len, ") are in the ", o.name,
        " split, but ",
        o.training ? absl::StrCat("one global batch = dp ", o.dp, " x train.micro_batch ", o.micro_batch,
                                  " x train.grad_accum ", o.grad_accum, " = ", global_batch, " samples (",
                                  global_batch * o.seq_len + 1, " tokens)")
                   : std::string("evaluation"),
        " needs ", need, "; use a smaller train.micro_batch, train.grad_accum or model.seq_len",
        o.name == "train" ? ", a smaller data.valid_fraction" : "", ", or more data"));
  }
  std::unique_ptr<Sampler> s(new Sampler());
  s->source_ = std::move(source);
  s->options_ = o;
  s->first_sample_ = first_sample;
  s->num_samples_ = num_samples;
  s->LoadEpoch();
  return s;
}

void Sampler::LoadEpoch() {
  if (options_.shuffle && options_.training) {
    order_ = ShufflePermutation(num_samples_, options_.seed, state_.epoch);
  } else {
    order_.clear();
  }
}

void Sampler::Advance() {
  state_.position += global_batch();
  if (state_.position + global_batch() > num_samples_) {
    state_.epoch += 1;
    state_.position = 0;
    LoadEpoch();
  }
}

absl::Status Sampler::Restore(const SamplerState& state) {
  if (state.epoch < 0 || state.position < 0) {
    return absl::InvalidArgumentError(absl::StrCat(options_.name, " sampler state (epoch ", state.epoch,
                                                   ", position ", state.position, ") must be non-negative"));
  }
  state_ = state;
  if (state_.position + global_batch() > num_samples_) {
    state_.epoch += 1;
    state_.position = 0;
  }
  LoadEpoch();
  return absl::OkStatus();
}

SamplerState Sampler::StateAtStep(int64_t step) const {
  const int64_t per_epoch = batches_per_epoch();
  return SamplerState{step / per_epoch, (step % per_epoch) * global_batch()};
}

std::vector<int64_t> Sampler::MicroBatchSamples(int64_t accum_step, int64_t dp_rank) const {
  const int64_t mb = options_.micro_batch;
  const int64_t m = accum_step * options_.dp + dp_rank;
  std::vector<int64_t> samples(static_cast<size_t>(mb));
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t pos = state_.position + m * mb + i;
    samples[i] = order_.empty() ? pos : order_[pos];
  }
  return samples;
}

absl::Status Sampler::ReadSample(int64_t sample, int32_t* out) const {
  return source_->Read((first_sample_ + sample) * options_.seq_len, options_.seq_len + 1, out);
}

absl::Status Sampler::ReadSamples(const std::vector<int64_t>& samples, int32_t* out) const {
  for (size_t i = 0; i < samples.size(); ++i) {
    RETURN_IF_ERROR(ReadSample(samples[i], out + static_cast<int64_t>(i) * (options_.seq_len + 1)));
  }
  return absl::OkStatus();
}

absl::Status Sampler::MicroBatch(int64_t accum_step, int64_t dp_rank, int32_t* out) const {
  if (accum_step < 0 || accum_step >= options_.grad_accum || dp_rank < 0 || dp_rank >= options_.dp) {
    return absl::InvalidArgumentError(absl::StrCat(options_.name, " sampler: micro-batch (accum_step ",
                                                   accum_step, ", dp_rank ", dp_rank, ") outside grad_accum ",
                                                   options_.grad_accum, " x dp ", options_.dp));
  }
  return ReadSamples(MicroBatchSamples(accum_step, dp_rank), out);
}

int64_t Sampler::num_eval_batches() const { return std::max<int64_t>(1, num_samples_ / global_batch()); }

std::vector<int64_t> Sampler::EvalMicroBatchSamples(int64_t batch, int64_t accum_step,
                                                    int64_t dp_rank) const {
  const int64_t mb = options_.micro_batch;
  const int64_t first = batch * global_batch() + (accum_step * options_.dp + dp_rank) * mb;
  std::vector<int64_t> samples(static_cast<size_t>(mb));
  for (int64_t i = 0; i < mb; ++i) samples[i] = (first + i) % num_samples_;
  return samples;
}

absl::Status Sampler::EvalMicroBatch(int64_t batch, int64_t accum_step, int64_t dp_rank, int32_t* out) const {
  if (batch < 0 || accum_step < 0 || accum_step >= options_.grad_accum || dp_rank < 0 ||
      dp_rank >= options_.dp) {
    return absl::InvalidArgumentError(absl::StrCat(
        options_.name, " sampler: eval micro-batch (batch ", batch, ", accum_step ", accum_step, ", dp_rank ",
        dp_rank, ") outside grad_accum ", options_.grad_accum, " x dp ", options_.dp));
  }
  return ReadSamples(EvalMicroBatchSamples(batch, accum_step, dp_rank), out);
}

}  // namespace moe::data
