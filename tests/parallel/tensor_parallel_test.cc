// TP region helpers under mpirun against world-size arithmetic: all-reduce,
// all-gather of row slices (even and uneven), split, reduce-scatter.
#include "parallel/tensor_parallel.h"

#include <catch2/catch.hpp>
#include <vector>

#include "comm/mpi_env.h"
#include "tests/parallel/parallel_test_util.h"

namespace moe::parallel {
namespace {

using testing::Cpu;
using testing::HostTensor;
using testing::ToVector;
using testing::ValueOrDie;

constexpr int64_t kHidden = 3;

// Element (row, j) of TP rank r's full tensor (small integers: sums are exact).
float Value(int r, int64_t row, int64_t j) { return static_cast<float>((r + 1) * 100 + row * kHidden + j); }

std::vector<float> Full(int r, int64_t rows) {
  std::vector<float> v(rows * kHidden);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < kHidden; ++j) v[i * kHidden + j] = Value(r, i, j);
  return v;
}

TEST_CASE("RowSlice covers the rows once, in rank order", "[tensor_parallel]") {
  for (int64_t rows : {0, 1, 7, 8, 13})
    for (int size : {1, 2, 3, 4}) {
      int64_t next = 0;
      for (int r = 0; r < size; ++r) {
        auto [b, e] = RowSlice(rows, size, r);
        REQUIRE(b == next);
        REQUIRE(e - b >= rows / size);
        REQUIRE(e - b <= rows / size + 1);
        next = e;
      }
      REQUIRE(next == rows);
    }
}

void CheckGroup(comm::Communicator& tp) {
  Stream& stream = Cpu().default_stream();
  const int P = tp.size(), me = tp.rank();
  for (int64_t rows : {8, 7, 1}) {
    INFO("rows " << rows << " tp " << P);
    // AllReduceSum.
    Tensor t = HostTensor(Full(me, rows), Shape{rows, kHidden});
    REQUIRE(AllReduceSum(tp, stream, t).ok());
    std::vector<float> s = ToVector(t);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < kHidden; ++j) {
        float want = 0;
        for (int r = 0; r < P; ++r) want += Value(r, i, j);
        REQUIRE(s[i * kHidden + j] == want);
      }
    // AllGatherRows of each rank's slice of its own tensor.
    auto [b, e] = RowSlice(rows, P, me);
    std::vector<float> mine = Full(me, rows);
    Tensor local = HostTensor(std::vector<float>(mine.begin() + b * kHidden, mine.begin() + e * kHidden),
                              Shape{e - b, kHidden});
    Tensor full = ValueOrDie(AllGatherRows(tp, stream, local, rows));
    REQUIRE(full.shape() == Shape({rows, kHidden}));
    std::vector<float> f = ToVector(full);
    for (int r = 0; r < P; ++r) {
      auto [rb, re] = RowSlice(rows, P, r);
      for (int64_t i = rb; i < re; ++i)
        for (int64_t j = 0; j < kHidden; ++j) REQUIRE(f[i * kHidden + j] == Value(r, i, j));
    }
    // SplitRows is AllGatherRows' inverse.
    Tensor back = SplitRows(full, P, me);
    REQUIRE(ToVector(back) == ToVector(local));
    // ReduceScatterRows: this rank's rows of the sum.
    Tensor rs = ValueOrDie(ReduceScatterRows(tp, stream, HostTensor(Full(me, rows), Shape{rows, kHidden})));
    REQUIRE(rs.size(0) == e - b);
    std::vector<float> v = ToVector(rs);
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < kHidden; ++j) {
        float want = 0;
        for (int r = 0; r < P; ++r) want += Value(r, i, j);
        REQUIRE(v[(i - b) * kHidden + j] == want);
      }
  }
  // A slice of the wrong size is refused on every rank before any transfer.
  Tensor bad = HostTensor(std::vector<float>(kHidden * 9, 0.f), Shape{9, kHidden});
  REQUIRE_FALSE(AllGatherRows(tp, stream, bad, 8).ok());
}

TEST_CASE("TP helpers over the world group", "[tensor_parallel]") {
  ProcessGroups g = testing::Groups(comm::MpiEnv::world_size(), 1);
  CheckGroup(*g.tp);
}

TEST_CASE("TP helpers over TP subgroups (tp 2)", "[tensor_parallel]") {
  if (comm::MpiEnv::world_size() % 2 != 0) return;
  ProcessGroups g = testing::Groups(2, 1);
  REQUIRE(g.tp->size() == 2);
  CheckGroup(*g.tp);
}

}  // namespace
}  // namespace moe::parallel
