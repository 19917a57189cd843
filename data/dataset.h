// The data entry point of a training job: what the trainer calls once, before
// building the model, so that every data problem is reported before training.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<data::TrainingData> data,
//                    data::OpenTrainingData(config, layout.dp));
//   for (step ...) {
//     for (a < grad_accum) data->train->MicroBatch(a, dp_rank, tokens);  // [micro_batch, seq_len + 1]
//     data->train->Advance();
//   }
//   checkpoint: data->train->state().ToInts(); resume: data->train->Restore(...)
//   eval: for (b < train.eval_batches, a < grad_accum) data->valid->EvalMicroBatch(b, a, dp_rank, tokens)
//
// dp_rank is layout.dp_rank: the TP ranks of one data-parallel replica read the
// same micro-batch. Every rank opens the files itself (read through the page cache,
// which the ranks of a node share); no communication happens here: a read that fails
// later (a file truncated under the job) fails on its rank only, and the trainer
// agrees on it over the control plane (runtime/trainer.h).
#ifndef MOE_DATA_DATASET_H_
#define MOE_DATA_DATASET_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "data/sampler.h"
#include "data/token_source.h"
#include "runtime/core/config.pb.h"

namespace moe::data {

// Opens one token stream: format "megatron" (path = PREFIX, PREFIX.bin or
// PREFIX.idx) or "hdf5" (path = .h5 file, dataset = its 1-D token dataset).
absl::StatusOr<std::shared_ptr<const TokenSource>> OpenTokenSource(const std::string& format,
                                                                   const std::string& path,
                                                                   const std::string& hdf5_dataset);

struct TrainingData {
  std::shared_ptr<const TokenSource> train_source;
  std::shared_ptr<const TokenSource> valid_source;  // == train_source when split by fraction
  std::unique_ptr<Sampler> train;                   // shuffle = data.shuffle, seed = train.seed
  std::unique_ptr<Sampler> valid;                   // nullptr: no validation (fraction 0, no path)
  // One line for the log: "train: corpus.{bin,idx} 2,400,000 tokens, 18,000 samples (...)".
  std::string Summary() const;
};

// Opens data.train_path (and data.valid_path) with data.format, checks every
// token against model.vocab_size (a full scan), and builds the samplers from
// model.seq_len, train.micro_batch, train.grad_accum, train.seed, data.shuffle and
// `dp` (the data-parallel size of the layout). Without data.valid_path the last
// ceil(data.valid_fraction * N) of the N samples of train_path (by stream
// position, before shuffling) are the validation split, the rest training.
// Expects a config after ApplyDefaults(). Errors: missing files, corrupt or
// mismatched .bin/.idx, unknown dtype code, out-of-vocabulary tokens, fewer
// tokens than one global batch; each names the file, the numbers and the fix.
absl::StatusOr<std::unique_ptr<TrainingData>> OpenTrainingData(const config::JobConfig& config, int dp);

}  // namespace moe::data

#endif  // MOE_DATA_DATASET_H_
