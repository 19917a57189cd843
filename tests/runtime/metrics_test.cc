#include "runtime/metrics.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/core/json.h"

namespace moe {
namespace {

TEST_CASE("a metrics line is valid JSON with every field") {
  JsonLine line;
  line.Add("step", 3).Add("loss", 2.5).Add("lr", 1e-4).Add("fired", true).Add("name", "a\"b");
  line.Add("counts", std::vector<int64_t>{1, 2, 3}).Add("nan", std::nan(""));
  line.AddRaw("layers", "[{\"layer\":0}]");
  JsonValue v = ParseJson(line.str()).value();
  CHECK(v.Find("step")->number == 3);
  CHECK(v.Find("loss")->number == 2.5);
  CHECK(v.Find("lr")->number == Approx(1e-4));
  CHECK(v.Find("fired")->boolean);
  CHECK(v.Find("name")->string == "a\"b");
  CHECK(v.Find("counts")->array.size() == 3);
  CHECK(v.Find("nan")->string == "nan");
  CHECK(v.Find("layers")->array[0].Find("layer")->number == 0);
}

TEST_CASE("the writer appends lines and reports a bad path") {
  auto dir = std::filesystem::temp_directory_path() / ("moe_metrics_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string path = (dir / "metrics.jsonl").string();
  {
    MetricsWriter w = MetricsWriter::Open(path, /*append=*/false).value();
    REQUIRE(w.Write(JsonLine().Add("step", 1)).ok());
  }
  {
    MetricsWriter w = MetricsWriter::Open(path, /*append=*/true).value();
    REQUIRE(w.Write(JsonLine().Add("step", 2)).ok());
  }
  std::ifstream in(path);
  std::string a, b;
  std::getline(in, a);
  std::getline(in, b);
  CHECK(a == "{\"step\":1}");
  CHECK(b == "{\"step\":2}");
  auto bad = MetricsWriter::Open("/nonexistent/dir/metrics.jsonl", false);
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("train.run_dir") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("the JSON reader reports where it failed") {
  auto r = ParseJson("{\"a\": [1, 2,, 3]}");
  REQUIRE_FALSE(r.ok());
  CHECK(std::string(r.status().message()).find("byte 12") != std::string::npos);
  CHECK(ParseJson("{\"s\": \"\\u00e9\"}").value().Find("s")->string == "\xc3\xa9");
}

}  // namespace
}  // namespace moe
