// The main() of multi-rank tests: every rank runs the same Catch2 session
// under mpirun. A rank whose tests fail aborts the whole job (so no rank is
// left waiting in a collective); only rank 0 prints passing summaries.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>

#include "comm/mpi_env.h"

int main(int argc, char** argv) {
  absl::Status status = moe::comm::MpiEnv::Init(&argc, &argv);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
    return 1;
  }
  Catch::Session session;
  int code = session.applyCommandLine(argc, argv);
  if (code != 0) return code;
  int failed = session.run();
  if (failed != 0) {
    std::fprintf(stderr, "[rank %d] %d test case(s) failed; aborting the job\n",
                 moe::comm::MpiEnv::world_rank(), failed);
    moe::comm::MpiEnv::Abort(1);
  }
  moe::comm::MpiEnv::Finalize();
  return 0;
}
