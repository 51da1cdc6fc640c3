// A c10d Store whose every operation is made in Rust: the rendezvous store the coordinator
// keeps for a generation (coordinator/src/rendezvous.rs), reached over the authenticated
// control plane. ProcessGroupGloo and ProcessGroupNCCL bootstrap through it exactly as through
// a TCPStore, but no worker listens for the store, and only the generation's ranks reach it.
//
// The Rust side (collective::KeyValue) gets each operation through one callback; results come
// back through a sink, and a context it owns is released once the last Store copy (clone())
// is gone.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern "C" {
// Receives result bytes (called at most once per operation).
typedef void (*axial_kv_sink)(void* sink, const uint8_t* data, size_t len);
// One operation (op: the codes of axial.v1.StoreRequest.Op). Returns 0 on success, 2 when the
// keys were not set within timeout_ms, 1 on any other error (err filled in).
typedef int (*axial_kv_op)(void* ctx, int op, const char* const* keys, const size_t* key_lens,
                           size_t nkeys, const uint8_t* value, size_t value_len,
                           const uint8_t* expected, size_t expected_len, int64_t amount,
                           int64_t timeout_ms, void* sink, axial_kv_sink sink_fn,
                           int64_t* number, char* err, size_t err_len);
typedef void (*axial_kv_free)(void* ctx);
}

namespace {

enum Op { kSet = 0, kGet = 1, kAdd = 2, kCheck = 3, kWait = 4, kDelete = 5, kCompareSet = 6, kNumKeys = 7 };

struct Callbacks {
  void* ctx;
  axial_kv_op op;
  axial_kv_free release;
  Callbacks(void* c, axial_kv_op o, axial_kv_free r) : ctx(c), op(o), release(r) {}
  Callbacks(const Callbacks&) = delete;
  Callbacks& operator=(const Callbacks&) = delete;
  ~Callbacks() { release(ctx); }
};

void collect(void* sink, const uint8_t* data, size_t len) {
  auto* out = static_cast<std::vector<uint8_t>*>(sink);
  out->assign(data, data + len);
}

class KeyValueStore : public c10d::Store {
 public:
  KeyValueStore(std::shared_ptr<Callbacks> callbacks, std::chrono::milliseconds timeout)
      : c10d::Store(timeout), callbacks_(std::move(callbacks)) {}

  c10::intrusive_ptr<c10d::Store> clone() override {
    return c10::make_intrusive<KeyValueStore>(callbacks_, timeout_);
  }

  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    call(kSet, {key}, value, {}, 0, timeout_);
  }

  std::vector<uint8_t> compareSet(const std::string& key, const std::vector<uint8_t>& expected,
                                  const std::vector<uint8_t>& desired) override {
    return call(kCompareSet, {key}, desired, expected, 0, timeout_).value;
  }

  std::vector<uint8_t> get(const std::string& key) override {
    return call(kGet, {key}, {}, {}, 0, timeout_).value;
  }

  int64_t add(const std::string& key, int64_t value) override {
    return call(kAdd, {key}, {}, {}, value, timeout_).number;
  }

  bool deleteKey(const std::string& key) override {
    return call(kDelete, {key}, {}, {}, 0, timeout_).number != 0;
  }

  bool check(const std::vector<std::string>& keys) override {
    return call(kCheck, keys, {}, {}, 0, timeout_).number != 0;
  }

  int64_t getNumKeys() override { return call(kNumKeys, {}, {}, {}, 0, timeout_).number; }

  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }

  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    call(kWait, keys, {}, {}, 0, timeout);
  }

 private:
  struct Result {
    std::vector<uint8_t> value;
    int64_t number = 0;
  };

  Result call(int op, const std::vector<std::string>& keys, const std::vector<uint8_t>& value,
              const std::vector<uint8_t>& expected, int64_t amount,
              std::chrono::milliseconds timeout) {
    std::vector<const char*> ptrs;
    std::vector<size_t> lens;
    for (const auto& k : keys) {
      ptrs.push_back(k.data());
      lens.push_back(k.size());
    }
    Result out;
    char err[1024] = {0};
    int rc = callbacks_->op(callbacks_->ctx, op, ptrs.data(), lens.data(), keys.size(),
                            value.data(), value.size(), expected.data(), expected.size(), amount,
                            timeout.count(), &out.value, collect, &out.number, err, sizeof err);
    err[sizeof err - 1] = '\0';
    if (rc == 2) {
      C10_THROW_ERROR(DistStoreError, std::string("rendezvous store: ") + err);
    }
    if (rc != 0) {
      C10_THROW_ERROR(DistNetworkError, std::string("rendezvous store: ") + err);
    }
    return out;
  }

  std::shared_ptr<Callbacks> callbacks_;
};

}  // namespace

extern "C" {

// A store over the Rust callbacks; `release(ctx)` runs when the last copy is dropped. Returns a
// c10d::Store* that axial_store_free releases.
void* axial_kv_store_new(void* ctx, axial_kv_op op, axial_kv_free release, int64_t timeout_ms) {
  auto callbacks = std::make_shared<Callbacks>(ctx, op, release);
  auto store = c10::make_intrusive<KeyValueStore>(callbacks, std::chrono::milliseconds(timeout_ms));
  return static_cast<c10d::Store*>(store.release());
}

}  // extern "C"
