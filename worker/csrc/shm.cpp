// Shared-memory sums for the ranks of a group on one host (shm.hpp).
#include "shm.hpp"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <csignal>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <new>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace axial {

struct Shm::Header {
  alignas(64) std::atomic<uint32_t> arrived;
  alignas(64) std::atomic<uint32_t> generation;  // the futex word the waiters sleep on
  alignas(64) std::atomic<uint32_t> aborted;
  int64_t world;
  int64_t capacity;
};

namespace {

constexpr size_t kHeaderBytes = 256;
// Float64 values per slot (2 MB; a longer tensor goes through in chunks), and all slots
// together at most 64 MB.
constexpr int64_t kCapacity = 1 << 18;
constexpr size_t kMaxBytes = size_t{64} << 20;
// Spins before sleeping: some 20 microseconds, the time a peer that is about to arrive needs.
constexpr int kSpins = 1000;
// Sleeps are cut into slices this long, to look at the timeout, the aborts and the peers.
constexpr long kSliceNs = 2'000'000;

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

std::string ns_inode(const char* which) {
  struct stat st {};
  std::string path = std::string("/proc/self/ns/") + which;
  if (::stat(path.c_str(), &st) != 0) return "?";
  return std::to_string(static_cast<unsigned long long>(st.st_ino));
}

// What two ranks must share to share memory: the machine's boot, the network namespace (ranks
// in namespaces of their own stand for separate hosts and talk through the network), and the
// mount and IPC namespaces (/dev/shm).
std::string host_identity() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::ostringstream id;
  id << host << '/' << read_first_line("/proc/sys/kernel/random/boot_id") << '/'
     << ns_inode("net") << '/' << ns_inode("mnt") << '/' << ns_inode("ipc");
  return id.str();
}

std::string get(c10d::Store& store, const std::string& key) {
  auto v = store.get(key);
  return std::string(v.begin(), v.end());
}

void set(c10d::Store& store, const std::string& key, const std::string& value) {
  store.set(key, std::vector<uint8_t>(value.begin(), value.end()));
}

long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

std::shared_ptr<Shm> Shm::create(c10d::Store& store, int rank, int world,
                                 std::chrono::milliseconds timeout) {
  const char* env = std::getenv("AXIAL_SHM");
  if (world < 2 || (env != nullptr && std::string(env) == "0")) return nullptr;
  const std::string prefix = "axial/shm/";
  set(store, prefix + "id/" + std::to_string(rank), host_identity());
  set(store, prefix + "pidns/" + std::to_string(rank), ns_inode("pid"));
  set(store, prefix + "pid/" + std::to_string(rank), std::to_string(::getpid()));
  bool local = true, same_pids = true;
  const std::string mine = host_identity(), my_pidns = ns_inode("pid");
  for (int r = 0; r < world; ++r) {
    local &= get(store, prefix + "id/" + std::to_string(r)) == mine;
    same_pids &= get(store, prefix + "pidns/" + std::to_string(r)) == my_pidns;
  }
  if (!local) return nullptr;

  int64_t capacity = kCapacity;
  while (capacity > 256 && kHeaderBytes + size_t(2) * world * capacity * sizeof(double) > kMaxBytes) {
    capacity /= 2;
  }
  const size_t bytes = kHeaderBytes + size_t(2) * world * capacity * sizeof(double);
  std::string name;
  int fd = -1;
  if (rank == 0) {
    std::random_device rd;
    std::ostringstream n;
    n << "/axial-" << ::getpid() << '-' << std::hex << rd() << rd();
    name = n.str();
    fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd >= 0 && ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      ::close(fd);
      ::shm_unlink(name.c_str());
      fd = -1;
    }
    set(store, prefix + "name", fd >= 0 ? name : std::string());
  } else {
    name = get(store, prefix + "name");
    if (!name.empty()) fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  }
  void* base = MAP_FAILED;
  if (fd >= 0) {
    base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
  }
  const bool ok = base != MAP_FAILED;
  if (ok && rank == 0) {
    auto* h = new (base) Header();
    h->arrived.store(0);
    h->generation.store(0);
    h->aborted.store(0);
    h->world = world;
    h->capacity = capacity;
  }
  set(store, prefix + "ok/" + std::to_string(rank), ok ? "1" : "0");
  bool all = true;
  for (int r = 0; r < world; ++r) all &= get(store, prefix + "ok/" + std::to_string(r)) == "1";
  // Every rank has mapped it (or given up): the name can go, the mappings stay.
  if (rank == 0 && !name.empty()) ::shm_unlink(name.c_str());
  if (!all) {
    if (ok) ::munmap(base, bytes);
    return nullptr;
  }
  std::shared_ptr<Shm> shm(new Shm());
  shm->header_ = static_cast<Header*>(base);
  shm->slots_ = reinterpret_cast<double*>(static_cast<char*>(base) + kHeaderBytes);
  shm->bytes_ = bytes;
  shm->rank_ = rank;
  shm->world_ = world;
  shm->capacity_ = capacity;
  shm->timeout_ = timeout;
  if (same_pids) {
    for (int r = 0; r < world; ++r) {
      if (r != rank) shm->peers_.push_back(std::stoi(get(store, prefix + "pid/" + std::to_string(r))));
    }
  }
  return shm;
}

Shm::~Shm() {
  if (header_ != nullptr) ::munmap(header_, bytes_);
}

void Shm::abort() {
  if (header_ == nullptr) return;
  header_->aborted.store(1, std::memory_order_release);
  // Wake every sleeper: they look at the flag.
  header_->generation.fetch_add(1, std::memory_order_acq_rel);
  futex(&header_->generation, FUTEX_WAKE, INT_MAX, nullptr);
}

namespace {

// Whether process `pid` has ended: gone from the table, or a zombie its parent has not reaped.
bool ended(int pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return true;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  const auto close = line.rfind(')');  // the command name may hold spaces and parentheses
  return close != std::string::npos && close + 2 < line.size() &&
         (line[close + 2] == 'Z' || line[close + 2] == 'X');
}

}  // namespace

void Shm::check_peers() const {
  for (int pid : peers_) {
    if (ended(pid)) {
      throw std::runtime_error("a peer rank's process (pid " + std::to_string(pid) + ") is gone");
    }
  }
}

void Shm::barrier(const std::atomic<bool>& aborted) {
  Header* h = header_;
  const uint32_t gen = h->generation.load(std::memory_order_acquire);
  if (h->aborted.load(std::memory_order_acquire) != 0) {
    throw std::runtime_error("aborted: the coordinator ended this generation");
  }
  if (h->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint32_t>(world_)) {
    h->arrived.store(0, std::memory_order_relaxed);
    h->generation.fetch_add(1, std::memory_order_release);
    futex(&h->generation, FUTEX_WAKE, INT_MAX, nullptr);
    return;
  }
  for (int i = 0; i < kSpins; ++i) {
    if (h->generation.load(std::memory_order_acquire) != gen) break;
    relax();
  }
  const auto start = std::chrono::steady_clock::now();
  for (int slices = 0;; ++slices) {
    if (h->generation.load(std::memory_order_acquire) != gen) {
      if (h->aborted.load(std::memory_order_acquire) != 0) {
        throw std::runtime_error("aborted: the coordinator ended this generation");
      }
      return;
    }
    if (aborted.load(std::memory_order_relaxed) || h->aborted.load(std::memory_order_acquire) != 0) {
      throw std::runtime_error("aborted: the coordinator ended this generation");
    }
    if (std::chrono::steady_clock::now() - start > timeout_) {
      throw std::runtime_error("collective did not complete within its timeout");
    }
    if (slices % 8 == 7) check_peers();
    const timespec slice{0, kSliceNs};
    futex(&h->generation, FUTEX_WAIT, gen, &slice);
  }
}

namespace {

// out[i] = sum over r of slot r's values, in rank order.
template <typename T>
void add_slots(T* out, const double* buffer, int64_t stride_doubles, int world, int64_t n) {
  const T* first = reinterpret_cast<const T*>(buffer);
  std::memcpy(out, first, n * sizeof(T));
  for (int r = 1; r < world; ++r) {
    const T* slot = reinterpret_cast<const T*>(buffer + r * stride_doubles);
    for (int64_t i = 0; i < n; ++i) out[i] += slot[i];
  }
}

}  // namespace

bool Shm::sum(at::Tensor& t, const std::atomic<bool>& aborted) {
  if (!t.defined() || t.device().type() != at::kCPU || !t.is_contiguous() ||
      (t.scalar_type() != at::kDouble && t.scalar_type() != at::kFloat)) {
    return false;
  }
  std::lock_guard<std::mutex> lock(mu_);
  const bool f64 = t.scalar_type() == at::kDouble;
  const int64_t elem = f64 ? 8 : 4;
  const int64_t chunk = capacity_ * 8 / elem;  // values of this dtype per slot
  char* data = static_cast<char*>(t.data_ptr());
  for (int64_t at = 0, n = t.numel(); at < n; at += chunk) {
    const int64_t len = std::min(chunk, n - at);
    double* buffer = slots_ + (op_ % 2) * world_ * capacity_;
    ++op_;
    std::memcpy(buffer + rank_ * capacity_, data + at * elem, len * elem);
    barrier(aborted);
    // Every rank adds the slots in rank order: the same bits everywhere.
    if (f64) {
      add_slots(reinterpret_cast<double*>(data) + at, buffer, capacity_, world_, len);
    } else {
      add_slots(reinterpret_cast<float*>(data) + at, buffer, capacity_, world_, len);
    }
  }
  return true;
}

}  // namespace axial
