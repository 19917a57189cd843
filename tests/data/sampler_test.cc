// The sampler on a real .bin/.idx whose token at stream position p is p itself,
// so every row read back tells which sample it is.
#include "data/sampler.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <map>
#include <set>
#include <vector>

#include "data/dataset.h"
#include "data/indexed_dataset.h"
#include "runtime/core/config.h"
#include "tests/data/data_test_util.h"

namespace moe::data {
namespace {

using testing::TempDir;

// A dataset of `num_tokens` tokens (token p = p) cut into documents of 37 tokens.
std::string WritePositions(const TempDir& tmp, int64_t num_tokens) {
  const std::string prefix = tmp / "positions";
  auto w = IndexedDatasetWriter::Create(prefix, 1 << 24);
  REQUIRE(w.ok());
  std::vector<int32_t> doc;
  for (int64_t p = 0; p < num_tokens; ++p) {
    doc.push_back(static_cast<int32_t>(p));
    if (doc.size() == 37 || p + 1 == num_tokens) {
      REQUIRE((*w)->AddDocument(doc.data(), static_cast<int64_t>(doc.size())).ok());
      doc.clear();
    }
  }
  REQUIRE((*w)->Finish().ok());
  return prefix;
}

std::shared_ptr<const TokenSource> OpenPositions(const TempDir& tmp, int64_t num_tokens) {
  auto ds = IndexedDataset::Open(WritePositions(tmp, num_tokens));
  REQUIRE(ds.ok());
  return std::shared_ptr<const TokenSource>(std::move(*ds));
}

// Reads micro-batch (a, r) and returns its sample ids, checking each row is
// the seq_len + 1 consecutive tokens of that sample.
std::vector<int64_t> ReadMicroBatch(const Sampler& s, int64_t a, int64_t r, int64_t first_sample = 0) {
  const int64_t row = s.seq_len() + 1;
  std::vector<int32_t> tokens(s.micro_batch() * row, -1);
  REQUIRE(s.MicroBatch(a, r, tokens.data()).ok());
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < s.micro_batch(); ++i) {
    const int32_t first = tokens[i * row];
    REQUIRE(first % s.seq_len() == 0);
    for (int64_t j = 0; j < row; ++j) REQUIRE(tokens[i * row + j] == first + j);
    ids.push_back(first / s.seq_len() - first_sample);
  }
  CHECK(ids == s.MicroBatchSamples(a, r));
  return ids;
}

// Every micro-batch of the current global batch, in order m = a*dp + r.
std::vector<int64_t> GlobalBatch(const Sampler& s) {
  std::vector<int64_t> ids;
  for (int64_t a = 0; a < s.options().grad_accum; ++a) {
    for (int64_t r = 0; r < s.options().dp; ++r) {
      std::vector<int64_t> m = ReadMicroBatch(s, a, r);
      ids.insert(ids.end(), m.begin(), m.end());
    }
  }
  return ids;
}

SamplerOptions Opts(int64_t seq_len, int64_t mb, int64_t dp, int64_t ga, bool shuffle, uint64_t seed = 1234) {
  SamplerOptions o;
  o.seq_len = seq_len;
  o.micro_batch = mb;
  o.dp = dp;
  o.grad_accum = ga;
  o.shuffle = shuffle;
  o.seed = seed;
  return o;
}

TEST_CASE("ShufflePermutation matches the specification (values from an independent Python version)") {
  CHECK(ShufflePermutation(10, 1234, 0) == std::vector<int64_t>{3, 0, 8, 6, 5, 7, 9, 4, 2, 1});
  CHECK(ShufflePermutation(10, 1234, 1) == std::vector<int64_t>{5, 6, 0, 2, 7, 4, 8, 1, 3, 9});
  CHECK(ShufflePermutation(10, 7, 0) == std::vector<int64_t>{1, 6, 8, 2, 4, 9, 3, 0, 7, 5});
  std::vector<int64_t> p = ShufflePermutation(1000, 1234, 3);
  CHECK(std::vector<int64_t>(p.begin(), p.begin() + 8) ==
        std::vector<int64_t>{923, 834, 651, 897, 67, 267, 27, 664});
  std::sort(p.begin(), p.end());
  for (int64_t i = 0; i < 1000; ++i) REQUIRE(p[i] == i);
  CHECK(ShufflePermutation(1, 5, 5) == std::vector<int64_t>{0});
  CHECK(ShufflePermutation(0, 5, 5).empty());
}

TEST_CASE("no sample lost or repeated within an epoch, for every dp x grad_accum") {
  TempDir tmp;
  const int64_t seq_len = 8;
  auto source = OpenPositions(tmp, 8 * 203 + 1);  // 203 samples
  for (bool shuffle : {false, true}) {
    for (auto [dp, ga, mb] : std::vector<std::array<int64_t, 3>>{
             {1, 1, 4}, {2, 1, 2}, {1, 2, 2}, {4, 1, 1}, {2, 2, 1}, {1, 4, 1}, {3, 2, 5}, {8, 3, 2}}) {
      INFO("shuffle " << shuffle << " dp " << dp << " grad_accum " << ga << " micro_batch " << mb);
      auto s = Sampler::Create(source, 0, 203, Opts(seq_len, mb, dp, ga, shuffle));
      REQUIRE(s.ok());
      Sampler& sampler = **s;
      const int64_t g = dp * ga * mb;
      REQUIRE(sampler.batches_per_epoch() == 203 / g);
      for (int64_t epoch = 0; epoch < 2; ++epoch) {
        std::vector<int64_t> seen;
        for (int64_t b = 0; b < sampler.batches_per_epoch(); ++b) {
          REQUIRE(sampler.state().epoch == epoch);
          std::vector<int64_t> batch = GlobalBatch(sampler);
          seen.insert(seen.end(), batch.begin(), batch.end());
          sampler.Advance();
        }
        std::set<int64_t> unique(seen.begin(), seen.end());
        CHECK(unique.size() == seen.size());  // nothing repeated
        CHECK(static_cast<int64_t>(seen.size()) == (203 / g) * g);
        CHECK(*unique.rbegin() < 203);
        // Only the epoch's last 203 % g samples (in its order) are left out.
        std::vector<int64_t> order = shuffle ? ShufflePermutation(203, 1234, epoch) : std::vector<int64_t>();
        if (!shuffle) {
          for (int64_t i = 0; i < 203; ++i) order.push_back(i);
        }
        CHECK(seen == std::vector<int64_t>(order.begin(), order.begin() + static_cast<int64_t>(seen.size())));
      }
      CHECK(sampler.state() == SamplerState{2, 0});
    }
  }
}

TEST_CASE(
    "dp x grad_accum fixed: the same micro-batches in the same order (docs/model.md global batch rule)") {
  TempDir tmp;
  auto source = OpenPositions(tmp, 16 * 100 + 1);
  // micro-batch m of the global batch, for dp*ga = 4 split four ways.
  std::vector<std::vector<std::vector<int64_t>>> runs;
  for (auto [dp, ga] : std::vector<std::array<int64_t, 2>>{{4, 1}, {2, 2}, {1, 4}}) {
    auto s = Sampler::Create(source, 0, 100, Opts(16, 3, dp, ga, true, 99));
    REQUIRE(s.ok());
    std::vector<std::vector<int64_t>> micro;
    for (int step = 0; step < 20; ++step) {  // crosses an epoch (8 batches of 12 per epoch)
      for (int64_t m = 0; m < 4; ++m) micro.push_back(ReadMicroBatch(**s, m / dp, m % dp));
      (*s)->Advance();
    }
    runs.push_back(micro);
  }
  CHECK(runs[0] == runs[1]);
  CHECK(runs[0] == runs[2]);
}

// The evaluation set is a fixed set of sequences: the first eval_batches *
// global_batch samples of the split in stream order, whatever dp, grad_accum
// and micro_batch make up that global batch (so validation loss is
// layout-invariant). A sampler that gave each dp rank eval_batches
// micro-batches would grow the set with dp and fail here.
TEST_CASE("eval batches: the same sequences on every layout with the same global batch") {
  TempDir tmp;
  auto source = OpenPositions(tmp, 16 * 30 + 1);
  const int64_t batches = 3;  // 36 positions over 30 samples: the last 6 wrap around
  std::vector<int64_t> want;
  for (int64_t p = 0; p < batches * 12; ++p) want.push_back(p % 30);
  std::sort(want.begin(), want.end());
  for (auto [dp, ga, mb] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 12}, {4, 1, 3}, {2, 2, 3}, {1, 4, 3}, {2, 1, 6}, {12, 1, 1}, {3, 2, 2}}) {
    CAPTURE(dp, ga, mb);
    auto s = Sampler::Create(source, 0, 30, Opts(16, mb, dp, ga, true, 99));
    REQUIRE(s.ok());
    CHECK((*s)->num_eval_batches() == 2);
    std::vector<int64_t> seen;
    std::vector<int32_t> tokens(mb * 17);
    for (int64_t b = 0; b < batches; ++b) {
      for (int64_t a = 0; a < ga; ++a) {
        for (int64_t r = 0; r < dp; ++r) {
          REQUIRE((*s)->EvalMicroBatch(b, a, r, tokens.data()).ok());
          for (int64_t i = 0; i < mb; ++i) seen.push_back(tokens[i * 17] / 16);
        }
      }
    }
    std::sort(seen.begin(), seen.end());
    CHECK(seen == want);
  }
}

TEST_CASE("shuffle: deterministic from (seed, epoch); shuffle = false keeps file order") {
  TempDir tmp;
  auto source = OpenPositions(tmp, 4 * 64 + 1);
  auto batches = [&](bool shuffle, uint64_t seed, int steps) {
    auto s = Sampler::Create(source, 0, 64, Opts(4, 2, 2, 1, shuffle, seed));
    REQUIRE(s.ok());
    std::vector<int64_t> all;
    for (int i = 0; i < steps; ++i) {
      std::vector<int64_t> b = GlobalBatch(**s);
      all.insert(all.end(), b.begin(), b.end());
      (*s)->Advance();
    }
    return all;
  };
  CHECK(batches(true, 1234, 40) == batches(true, 1234, 40));
  CHECK(batches(true, 1234, 16) != batches(true, 1235, 16));
  std::vector<int64_t> two_epochs = batches(true, 1234, 32);
  CHECK(std::vector<int64_t>(two_epochs.begin(), two_epochs.begin() + 64) !=
        std::vector<int64_t>(two_epochs.begin() + 64, two_epochs.end()));  // a new order each epoch
  std::vector<int64_t> plain = batches(false, 1234, 20);
  for (size_t i = 0; i < plain.size(); ++i) CHECK(plain[i] == static_cast<int64_t>(i % 64));
}

TEST_CASE("state round trip: resuming mid-epoch gives the same future batches") {
  TempDir tmp;
  auto source = OpenPositions(tmp, 8 * 50 + 1);
  auto a = Sampler::Create(source, 0, 50, Opts(8, 2, 2, 2, true));  // 6 batches of 8 per epoch
  REQUIRE(a.ok());
  for (int step = 0; step < 9; ++step) (*a)->Advance();  // epoch 1, batch 3
  const std::array<int64_t, 2> saved = (*a)->state().ToInts();
  CHECK(saved == std::array<int64_t, 2>{1, 24});
  CHECK((*a)->StateAtStep(9) == (*a)->state());
  // A different layout with the same dp * grad_accum resumes from the same state.
  auto b = Sampler::Create(source, 0, 50, Opts(8, 2, 4, 1, true));
  REQUIRE(b.ok());
  REQUIRE((*b)->Restore(SamplerState::FromInts(saved)).ok());
  for (int step = 9; step < 30; ++step) {
    INFO("step " << step);
    CHECK(GlobalBatch(**a) == GlobalBatch(**b));
    CHECK((*a)->state() == (*b)->state());
    CHECK((*b)->StateAtStep(step) == (*b)->state());
    (*a)->Advance();
    (*b)->Advance();
  }
  // A saved position past the last full batch moves to the next epoch, as Advance would.
  REQUIRE((*b)->Restore({3, 48}).ok());
  CHECK((*b)->state() == SamplerState{4, 0});
  CHECK_FALSE((*b)->Restore({-1, 0}).ok());
}

TEST_CASE("the header's worked example: epoch wrap skips the remainder") {
  TempDir tmp;
  auto source = OpenPositions(tmp, 3 * 10 + 1);
  auto s = Sampler::Create(source, 0, 10, Opts(3, 2, 2, 1, false));
  REQUIRE(s.ok());
  CHECK(GlobalBatch(**s) == std::vector<int64_t>{0, 1, 2, 3});
  CHECK(ReadMicroBatch(**s, 0, 1) == std::vector<int64_t>{2, 3});
  (*s)->Advance();
  CHECK(GlobalBatch(**s) == std::vector<int64_t>{4, 5, 6, 7});
  (*s)->Advance();
  CHECK((*s)->state() == SamplerState{1, 0});
  CHECK(GlobalBatch(**s) == std::vector<int64_t>{0, 1, 2, 3});
  int32_t row[8];
  CHECK_FALSE((*s)->MicroBatch(1, 0, row).ok());  // grad_accum is 1
  CHECK_FALSE((*s)->MicroBatch(0, 2, row).ok());  // dp is 2
}

TEST_CASE("OpenTrainingData: fraction split holds out the last samples; eval batches are fixed") {
  TempDir tmp;
  const std::string prefix = WritePositions(tmp, 16 * 200 + 1);  // 200 samples
  JobConfig config;
  config.mutable_data()->set_train_path(prefix);
  config.mutable_data()->set_valid_fraction(0.1);
  config.mutable_model()->set_seq_len(16);
  config.mutable_model()->set_vocab_size(1 << 24);
  config.mutable_train()->set_micro_batch(2);
  config.mutable_train()->set_grad_accum(2);
  ApplyDefaults(4, &config);
  auto data = OpenTrainingData(config, 2);
  REQUIRE(data.ok());
  const TrainingData& d = **data;
  REQUIRE(d.valid != nullptr);
  CHECK(d.train->num_samples() == 180);
  CHECK(d.valid->num_samples() == 20);
  CHECK(d.valid_source == d.train_source);
  CHECK(d.train->options().shuffle);  // data.shuffle's default
  CHECK_THAT(d.Summary(), Catch::Contains("180 samples") && Catch::Contains("20 samples"));
  // No training batch ever reaches the held-out samples.
  std::set<int64_t> train_seen;
  for (int step = 0; step < 45; ++step) {
    for (int64_t a = 0; a < 2; ++a) {
      for (int64_t r = 0; r < 2; ++r) {
        std::vector<int64_t> ids = ReadMicroBatch(*d.train, a, r);
        train_seen.insert(ids.begin(), ids.end());
      }
    }
    d.train->Advance();
  }
  CHECK(*train_seen.rbegin() < 180);
  CHECK(train_seen.size() == 180);
  // Eval: batch b is the global batch of 8 valid samples [8b, 8b + 8) mod 20,
  // micro-batch (a, r) holding positions (a*2 + r)*2 + i: stream samples 180..199.
  CHECK(d.valid->num_eval_batches() == 2);
  const int64_t row = 17;
  std::vector<int32_t> t(2 * row);
  std::set<int64_t> eval_seen;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t a = 0; a < 2; ++a) {
      for (int64_t r = 0; r < 2; ++r) {
        REQUIRE(d.valid->EvalMicroBatch(b, a, r, t.data()).ok());
        for (int i = 0; i < 2; ++i) {
          const int64_t sample = t[i * row] / 16;
          CHECK(sample == 180 + b * 8 + (a * 2 + r) * 2 + i);
          eval_seen.insert(sample);
        }
      }
    }
  }
  CHECK(eval_seen.size() == 16);
  REQUIRE(d.valid->EvalMicroBatch(2, 1, 1, t.data()).ok());  // positions 22, 23 wrap to 2, 3
  CHECK(t[0] == 182 * 16);
  CHECK(!d.valid->EvalMicroBatch(0, 2, 0, t.data()).ok());  // accum_step outside grad_accum
  CHECK(!d.valid->EvalMicroBatch(0, 0, 2, t.data()).ok());  // dp rank outside dp

  // With data.valid_path, all of train_path trains.
  config.mutable_data()->set_valid_path(prefix);
  config.mutable_data()->set_shuffle(false);
  auto with_path = OpenTrainingData(config, 2);
  REQUIRE(with_path.ok());
  CHECK((*with_path)->train->num_samples() == 200);
  CHECK((*with_path)->valid->num_samples() == 200);
  CHECK_FALSE((*with_path)->train->options().shuffle);
  // valid_fraction = 0 and no path: no validation split.
  config.mutable_data()->set_valid_path("");
  config.mutable_data()->set_valid_fraction(0);
  auto none = OpenTrainingData(config, 2);
  REQUIRE(none.ok());
  CHECK((*none)->valid == nullptr);
  CHECK((*none)->train->num_samples() == 200);
}

}  // namespace
}  // namespace moe::data
