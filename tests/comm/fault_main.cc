// A job that goes wrong on purpose, run under mpirun by watchdog_test.sh.
//
//   comm_fault_job skip TIMEOUT_S   rank 1 skips an AllReduce (then sleeps);
//                                   the others' watchdog must abort the job
//   comm_fault_job abort TIMEOUT_S  rank 1 calls abort() while the others wait
//   comm_fault_job exit TIMEOUT_S   rank 1 exits 0 without MPI_Finalize
//   comm_fault_job stop TIMEOUT_S   rank 1 stops itself (SIGSTOP); the others'
//                                   watchdog must name it as not answering
// Each prints "ready" after one good collective.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_env.h"

using namespace moe;
using namespace moe::comm;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s skip|abort|exit|stop TIMEOUT_S\n", argv[0]);
    return 2;
  }
  absl::Status s = MpiEnv::Init(&argc, &argv);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  const std::string mode = argv[1];
  CommOptions options;
  options.backend = "mpi";
  options.timeout_s = std::atof(argv[2]);
  auto world = CreateWorldCommunicator(options);
  if (!world.ok()) {
    std::fprintf(stderr, "%s\n", world.status().ToString().c_str());
    return 1;
  }
  Communicator& c = **world;
  std::vector<float> x(1024, 1.0f);
  auto w = c.AllReduce(x.data(), x.data(), x.size(), DType::kF32, ReduceOp::kSum);
  if (!w.ok() || !w->Wait().ok()) return 1;
  if (c.rank() == 0) std::printf("ready\n");
  std::fflush(stdout);
  if (c.rank() == 1) {
    if (mode == "abort") std::abort();
    if (mode == "exit") _exit(0);
    if (mode == "stop") raise(SIGSTOP);
    // skip: never join the next collective.
    std::this_thread::sleep_for(std::chrono::seconds(300));
    return 0;
  }
  w = c.AllReduce(x.data(), x.data(), x.size(), DType::kF32, ReduceOp::kSum);
  if (!w.ok()) return 1;
  absl::Status done = w->Wait();
  std::fprintf(stderr, "rank %d: the collective returned (%s); it should not have\n", c.rank(),
               done.ToString().c_str());
  return 3;
}
