#include "parallel/layout.h"

#include <catch2/catch.hpp>
#include <set>
#include <vector>

namespace moe::parallel {
namespace {

using Groups = std::set<std::vector<int>>;

template <typename Get>
Groups AllGroups(int world, int tp, int ep, Get get) {
  Groups g;
  for (int r = 0; r < world; ++r) g.insert(get(ComputeLayout(world, tp, ep, r).value()));
  return g;
}

TEST_CASE("docs/design.md's 8-rank example: world 8, TP 2, EP 2") {
  auto tp = AllGroups(8, 2, 2, [](const RankLayout& l) { return l.tp_group; });
  auto dp = AllGroups(8, 2, 2, [](const RankLayout& l) { return l.dp_group; });
  auto ep = AllGroups(8, 2, 2, [](const RankLayout& l) { return l.ep_group; });
  auto edp = AllGroups(8, 2, 2, [](const RankLayout& l) { return l.edp_group; });
  CHECK(tp == Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  CHECK(dp == Groups{{0, 2, 4, 6}, {1, 3, 5, 7}});
  CHECK(ep == Groups{{0, 2}, {4, 6}, {1, 3}, {5, 7}});
  CHECK(edp == Groups{{0, 4}, {2, 6}, {1, 5}, {3, 7}});

  RankLayout r5 = ComputeLayout(8, 2, 2, 5).value();
  CHECK(r5.tp == 2);
  CHECK(r5.dp == 4);
  CHECK(r5.ep == 2);
  CHECK(r5.edp == 2);
  CHECK(r5.tp_rank == 1);
  CHECK(r5.dp_rank == 2);
  CHECK(r5.ep_rank == 0);
  CHECK(r5.edp_rank == 1);
  CHECK(r5.ep_group == std::vector<int>{5, 7});
  CHECK(r5.edp_group == std::vector<int>{1, 5});
}

// Properties every layout holds, checked on every rank.
void CheckLayoutProperties(int world, int tp, int ep) {
  const int dp = world / tp;
  std::vector<std::set<int>> tp_ids(world), ep_ids(world);
  for (int r = 0; r < world; ++r) {
    RankLayout l = ComputeLayout(world, tp, ep, r).value();
    CAPTURE(world, tp, ep, r);
    REQUIRE(l.tp_group.size() == static_cast<size_t>(tp));
    REQUIRE(l.dp_group.size() == static_cast<size_t>(dp));
    REQUIRE(l.ep_group.size() == static_cast<size_t>(ep));
    REQUIRE(l.edp_group.size() == static_cast<size_t>(dp / ep));
    // The rank sits at its own index in each group.
    CHECK(l.tp_group[l.tp_rank] == r);
    CHECK(l.dp_group[l.dp_rank] == r);
    CHECK(l.ep_group[l.ep_rank] == r);
    CHECK(l.edp_group[l.edp_rank] == r);
    // TP groups are adjacent ranks.
    for (int i = 1; i < tp; ++i) CHECK(l.tp_group[i] == l.tp_group[0] + i);
    // EP and EDP partition the DP group: every DP member is in exactly one
    // (ep_rank, edp_rank) cell.
    for (int d : l.dp_group) {
      RankLayout o = ComputeLayout(world, tp, ep, d).value();
      CHECK(o.dp_group == l.dp_group);
      bool same_ep = o.ep_group == l.ep_group;
      bool same_edp = o.edp_group == l.edp_group;
      CHECK((same_ep && same_edp) == (d == r));
      // Same experts <=> same ep_rank.
      CHECK(same_edp == (o.ep_rank == l.ep_rank));
    }
    // Members of a group agree on the group's id.
    for (int m : l.ep_group) CHECK(ComputeLayout(world, tp, ep, m).value().ep_group_id == l.ep_group_id);
    for (int m : l.edp_group) CHECK(ComputeLayout(world, tp, ep, m).value().edp_group_id == l.edp_group_id);
  }
}

TEST_CASE("16 ranks with TP 2, EP 4") {
  CheckLayoutProperties(16, 2, 4);
  auto ep = AllGroups(16, 2, 4, [](const RankLayout& l) { return l.ep_group; });
  auto edp = AllGroups(16, 2, 4, [](const RankLayout& l) { return l.edp_group; });
  CHECK(ep == Groups{{0, 2, 4, 6}, {8, 10, 12, 14}, {1, 3, 5, 7}, {9, 11, 13, 15}});
  CHECK(edp == Groups{{0, 8}, {2, 10}, {4, 12}, {6, 14}, {1, 9}, {3, 11}, {5, 13}, {7, 15}});
  RankLayout r11 = ComputeLayout(16, 2, 4, 11).value();
  CHECK(r11.tp_rank == 1);
  CHECK(r11.dp_rank == 5);
  CHECK(r11.ep_rank == 1);
  CHECK(r11.edp_rank == 1);
}

TEST_CASE("layout properties across sizes") {
  for (int world : {1, 2, 4, 6, 8, 12, 16}) {
    for (int tp = 1; tp <= world; ++tp) {
      if (world % tp) continue;
      for (int ep = 1; ep <= world / tp; ++ep) {
        if ((world / tp) % ep) continue;
        CheckLayoutProperties(world, tp, ep);
      }
    }
  }
}

TEST_CASE("bad layouts name the numbers") {
  auto a = ComputeLayout(6, 4, 1, 0);
  REQUIRE_FALSE(a.ok());
  CHECK(a.status().message() == "parallel.tensor = 4 must divide the world size 6");
  auto b = ComputeLayout(8, 2, 3, 0);
  REQUIRE_FALSE(b.ok());
  CHECK(b.status().message() ==
        "parallel.expert = 3 must divide the data-parallel size 4 (world 8 / tensor 2)");
  CHECK_FALSE(ComputeLayout(4, 1, 1, 4).ok());
}

TEST_CASE("the start-up table lists groups") {
  std::string t = FormatLayoutTable(8, 2, 2).value();
  CHECK(t.find("EP groups   {0,2} {4,6} {1,3} {5,7}") != std::string::npos);
  CHECK(t.find("EDP groups  {0,4} {2,6} {1,5} {3,7}") != std::string::npos);
  CHECK(t.find("DP groups   {0,2,4,6} {1,3,5,7}") != std::string::npos);
}

TEST_CASE("expert ownership: contiguous blocks that cover every expert once, and each expert's owner") {
  for (int64_t E : {1, 4, 5, 8, 12, 64}) {
    for (int P : {1, 2, 3, 4, 8}) {
      if (P > E) continue;
      INFO("E " << E << " P " << P);
      int64_t next = 0;
      for (int r = 0; r < P; ++r) {
        const auto [b, e] = OwnedExperts(E, P, r);
        CHECK(b == next);
        CHECK(e > b);
        for (int64_t x = b; x < e; ++x) CHECK(ExpertOwner(x, E, P) == r);
        next = e;
      }
      CHECK(next == E);
    }
  }
  // docs/design.md: 8 experts over EP 2 -> [0, 4) and [4, 8).
  CHECK(OwnedExperts(8, 2, 1) == std::pair<int64_t, int64_t>{4, 8});
}

}  // namespace
}  // namespace moe::parallel
