#include "comm/peer_probe.h"

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moe::comm {
namespace {

constexpr int kProbeTag = 1;   // payload: uint32 probe id
constexpr int kAnswerTag = 2;  // payload: Answer

struct Answer {
  uint32_t id = 0;  // the probe's id, so a late answer to an earlier probe is not taken for this one
  char text[252] = {};
};

struct Outgoing {  // an answer on its way; its buffer lives until the send completed
  Answer answer;
  MPI_Request request = MPI_REQUEST_NULL;
};

std::mutex g_mu;  // guards everything below and every MPI call made here
MPI_Comm g_comm = MPI_COMM_NULL;
uint32_t g_next_id = 1;
std::deque<Outgoing> g_outgoing;

void ServeLocked(const std::string& state) {
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kProbeTag, g_comm, &flag, &st) != MPI_SUCCESS || !flag) break;
    uint32_t id = 0;
    if (MPI_Recv(&id, 1, MPI_UINT32_T, st.MPI_SOURCE, kProbeTag, g_comm, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      break;
    Outgoing& out = g_outgoing.emplace_back();
    out.answer.id = id;
    std::strncpy(out.answer.text, state.c_str(), sizeof(out.answer.text) - 1);
    MPI_Isend(&out.answer, sizeof(Answer), MPI_BYTE, st.MPI_SOURCE, kAnswerTag, g_comm, &out.request);
  }
  // Finished answers leave in order; one stuck at the front (a peer that is
  // gone) holds the others, which is harmless: the job is ending then.
  while (!g_outgoing.empty()) {
    int done = 0;
    MPI_Test(&g_outgoing.front().request, &done, MPI_STATUS_IGNORE);
    if (!done) break;
    g_outgoing.pop_front();
  }
}

}  // namespace

void PeerProbeInit() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_comm != MPI_COMM_NULL) return;
  if (MPI_Comm_dup(MPI_COMM_WORLD, &g_comm) != MPI_SUCCESS) {
    g_comm = MPI_COMM_NULL;
    return;
  }
  MPI_Comm_set_errhandler(g_comm, MPI_ERRORS_RETURN);
}

void PeerProbeShutdown() {
  std::lock_guard<std::mutex> lock(g_mu);
  // No request may be pending at MPI_Finalize: answers still in flight (to a
  // peer that stopped waiting) are released; MPI completes them on its own.
  for (Outgoing& out : g_outgoing) {
    int done = 0;
    if (out.request != MPI_REQUEST_NULL) MPI_Test(&out.request, &done, MPI_STATUS_IGNORE);
    if (!done && out.request != MPI_REQUEST_NULL) MPI_Request_free(&out.request);
  }
  g_outgoing.clear();
  g_comm = MPI_COMM_NULL;  // freed by MPI_Finalize with the world it duplicates
}

void PeerProbeServe(const std::string& state) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_comm == MPI_COMM_NULL) return;
  ServeLocked(state);
}

std::vector<PeerAnswer> PeerProbeAsk(const std::vector<int>& world_ranks, double wait_s,
                                     const std::string& state) {
  std::vector<PeerAnswer> answers;
  std::unique_lock<std::mutex> lock(g_mu);
  if (g_comm == MPI_COMM_NULL) return answers;
  int me = 0;
  MPI_Comm_rank(g_comm, &me);
  const uint32_t id = g_next_id++;
  struct Asked {
    uint32_t id;
    Answer answer;
    MPI_Request send = MPI_REQUEST_NULL, recv = MPI_REQUEST_NULL;
  };
  std::deque<Asked> asked;  // stable addresses for the buffers MPI holds
  for (int peer : world_ranks) {
    if (peer == me) continue;
    answers.push_back({peer, std::nullopt});
    Asked& a = asked.emplace_back();
    a.id = id;
    MPI_Isend(&a.id, 1, MPI_UINT32_T, peer, kProbeTag, g_comm, &a.send);
    MPI_Irecv(&a.answer, sizeof(Answer), MPI_BYTE, peer, kAnswerTag, g_comm, &a.recv);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
  size_t left = asked.size();
  while (left > 0 && std::chrono::steady_clock::now() < deadline) {
    ServeLocked(state);  // peers probing us at the same time get their answer
    for (size_t i = 0; i < asked.size(); ++i) {
      Asked& a = asked[i];
      if (a.recv == MPI_REQUEST_NULL) continue;
      int done = 0;
      MPI_Test(&a.recv, &done, MPI_STATUS_IGNORE);
      if (!done) continue;
      if (a.answer.id != id) {  // the late answer to an earlier probe: wait for this one's
        MPI_Irecv(&a.answer, sizeof(Answer), MPI_BYTE, answers[i].world_rank, kAnswerTag, g_comm, &a.recv);
        continue;
      }
      a.answer.text[sizeof(a.answer.text) - 1] = '\0';
      answers[i].state = a.answer.text;
      --left;
    }
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    lock.lock();
    if (g_comm == MPI_COMM_NULL) break;  // shut down meanwhile: withdraw below, before MPI_Finalize
  }
  for (Asked& a : asked) {  // peers that did not answer: withdraw what they would have matched
    if (a.recv != MPI_REQUEST_NULL) {
      MPI_Cancel(&a.recv);
      MPI_Request_free(&a.recv);
    }
    int done = 0;
    MPI_Test(&a.send, &done, MPI_STATUS_IGNORE);
    if (!done) {
      MPI_Cancel(&a.send);
      MPI_Request_free(&a.send);
    }
  }
  return answers;
}

std::string DescribePeerAnswers(const std::vector<PeerAnswer>& answers, double wait_s) {
  std::string silent, busy;
  for (const PeerAnswer& a : answers) {
    if (!a.state) {
      absl::StrAppend(&silent, silent.empty() ? "" : ", ", a.world_rank);
    } else {
      absl::StrAppend(&busy, busy.empty() ? "" : "; ", "world rank ", a.world_rank, " runs ", *a.state);
    }
  }
  std::string out;
  if (!silent.empty()) {
    out = absl::StrFormat(
        "world rank%s %s did not answer the watchdog's probe within %.1f s (unreachable or "
        "stopped)",
        silent.find(',') == std::string::npos ? "" : "s", silent, wait_s);
  }
  if (!busy.empty()) absl::StrAppend(&out, out.empty() ? "" : "; ", busy);
  return out;
}

}  // namespace moe::comm
