// Sums over the ranks of a group that all run on one host, through shared memory: the
// transport of the synchronized batch norms' all-reduces (about a hundred a step, a few
// kilobytes each) and of the gradient buckets when every rank is local. Over Gloo's TCP loopback each of them cost
// about 2 ms (a round trip through Gloo's worker threads and the kernel, on cores the ranks'
// compute needs); here a rank writes its vector into its slot, meets the others at a
// barrier, and sums the slots in rank order, so every rank gets the same bits.
//
// The barrier spins for a few microseconds, then sleeps on a futex in the segment (no core
// burnt while a slower rank computes; woken at once when the last rank arrives). Two buffers
// alternate between consecutive sums, so one barrier per sum is enough: a rank writes sum k+2
// into the buffer of sum k only after passing the barrier of sum k+1, which every rank reaches
// after reading sum k.
//
// A wait ends with an error at the group's timeout, when this rank's group is aborted, when
// any rank aborts the segment, or when a peer process is gone.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace axial {

class Shm {
 public:
  // Sets the segment up through the group's store when every rank runs on this host (same
  // boot, same network and mount namespaces) and can map it; null otherwise (the sums then
  // take the group's own backend). Every rank of the group must call it, at formation.
  // AXIAL_SHM=0 turns it off.
  static std::shared_ptr<Shm> create(c10d::Store& store, int rank, int world,
                                     std::chrono::milliseconds timeout);
  ~Shm();

  // In-place sum over the ranks of `t` (a contiguous CPU float32 or float64 tensor; a long one
  // in chunks of a slot); false when `t` is not such a tensor (nothing done: use the
  // backend). Throws on a timeout, an abort or a lost peer. `aborted`: this rank's group flag.
  bool sum(at::Tensor& t, const std::atomic<bool>& aborted);

  // Ends every rank's waits in this segment (the generation is over).
  void abort();

  int64_t capacity() const { return capacity_; }

 private:
  Shm() = default;
  void barrier(const std::atomic<bool>& aborted);
  void check_peers() const;

  struct Header;
  Header* header_ = nullptr;
  double* slots_ = nullptr;  // [2][world][capacity]
  size_t bytes_ = 0;
  int rank_ = 0;
  int world_ = 0;
  int64_t capacity_ = 0;
  uint64_t op_ = 0;
  std::mutex mu_;
  std::chrono::milliseconds timeout_{0};
  std::vector<int> peers_;  // the other ranks' pids, when this rank can see them
};

}  // namespace axial
