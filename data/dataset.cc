#include "data/dataset.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "data/hdf5_dataset.h"
#include "data/indexed_dataset.h"
#include "data/spm_tokenizer.h"
#include "runtime/core/status.h"

namespace moe::data {

absl::StatusOr<std::shared_ptr<const TokenSource>> OpenTokenSource(const std::string& format,
                                                                   const std::string& path,
                                                                   const std::string& hdf5_dataset) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "data.train_path is empty; set it to a Megatron prefix (PREFIX.bin/.idx, e.g. written by "
        "moe-preprocess --output-prefix PREFIX) or, with data.format = \"hdf5\", an .h5 file");
  }
  if (format == "megatron") {
    ASSIGN_OR_RETURN(std::unique_ptr<IndexedDataset> ds, IndexedDataset::Open(path));
    return std::shared_ptr<const TokenSource>(std::move(ds));
  }
  if (format == "hdf5") {
    ASSIGN_OR_RETURN(std::unique_ptr<Hdf5TokenDataset> ds, Hdf5TokenDataset::Open(path, hdf5_dataset));
    return std::shared_ptr<const TokenSource>(std::move(ds));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("data.format = \"", format, "\" is not a format; use \"megatron\" or \"hdf5\""));
}

std::string TrainingData::Summary() const {
  auto one = [](const char* name, const Sampler& s) {
    return absl::StrCat(name, ": ", s.source().Describe(), ", ", s.num_samples(), " samples of ",
                        s.seq_len() + 1, " tokens");
  };
  std::string out = absl::StrCat(one("train", *train), " (", train_source->num_tokens(), " tokens in file, ",
                                 train->batches_per_epoch(), " global batches of ", train->global_batch(),
                                 " per epoch, shuffle ", train->options().shuffle ? "on" : "off", ")");
  if (valid) absl::StrAppend(&out, "; ", one("valid", *valid));
  return out;
}

absl::StatusOr<std::unique_ptr<TrainingData>> OpenTrainingData(const config::JobConfig& config, int dp) {
  const config::DataConfig& d = config.data();
  const int64_t vocab = config.model().vocab_size();
  auto out = std::make_unique<TrainingData>();
  // A dataset made by moe-preprocess with another tokenizer names its vocabulary
  // (PREFIX.tokenizer): check model.vocab_size against it before reading tokens.
  if (d.format() == "megatron") {
    RETURN_IF_ERROR(CheckVocabAgainstTokenizer(IndexedDatasetPrefix(d.train_path()), vocab));
    if (!d.valid_path().empty()) {
      RETURN_IF_ERROR(CheckVocabAgainstTokenizer(IndexedDatasetPrefix(d.valid_path()), vocab));
    }
  }
  ASSIGN_OR_RETURN(out->train_source, OpenTokenSource(d.format(), d.train_path(), d.hdf5_dataset()));
  RETURN_IF_ERROR(out->train_source->Validate(vocab));

  SamplerOptions o;
  o.seq_len = config.model().seq_len();
  o.micro_batch = config.train().micro_batch();
  o.grad_accum = config.train().grad_accum();
  o.dp = dp;
  o.seed = config.train().seed();
  o.shuffle = d.shuffle();
  if (o.seq_len < 1) {
    return absl::InvalidArgumentError(absl::StrCat("model.seq_len = ", o.seq_len, " must be >= 1"));
  }
  const int64_t train_samples_all = std::max<int64_t>(0, (out->train_source->num_tokens() - 1) / o.seq_len);

  SamplerOptions vo = o;
  vo.training = false;
  vo.shuffle = false;
  vo.name = "valid";
  if (!d.valid_path().empty()) {
    ASSIGN_OR_RETURN(out->valid_source, OpenTokenSource(d.format(), d.valid_path(), d.hdf5_dataset()));
    RETURN_IF_ERROR(out->valid_source->Validate(vocab));
    ASSIGN_OR_RETURN(out->train, Sampler::Create(out->train_source, 0, train_samples_all, o));
    const int64_t valid_samples = std::max<int64_t>(0, (out->valid_source->num_tokens() - 1) / o.seq_len);
    ASSIGN_OR_RETURN(out->valid, Sampler::Create(out->valid_source, 0, valid_samples, vo));
    return out;
  }
  const double fraction = d.valid_fraction();
  if (!(fraction >= 0.0 && fraction < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("data.valid_fraction = ", fraction, " must be in [0, 1) (0: no validation)"));
  }
  const int64_t valid_samples =
      static_cast<int64_t>(std::ceil(fraction * static_cast<double>(train_samples_all)));
  ASSIGN_OR_RETURN(out->train, Sampler::Create(out->train_source, 0, train_samples_all - valid_samples, o));
  if (valid_samples > 0) {
    out->valid_source = out->train_source;
    ASSIGN_OR_RETURN(
        out->valid, Sampler::Create(out->valid_source, train_samples_all - valid_samples, valid_samples, vo));
  }
  return out;
}

}  // namespace moe::data
