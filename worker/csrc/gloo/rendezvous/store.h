// Declaration-only stand-ins for the gloo headers that ProcessGroupGloo.hpp includes. The torch
// wheel ships ProcessGroupGloo's header but not gloo's; the real gloo lives inside
// libtorch_cpu.so, and our shim only calls ProcessGroupGloo's own exported functions, so it needs
// these names to exist, never their definitions. (shared/reference/STACK.md §3.)
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace gloo {

class Context {
 public:
  virtual ~Context();
  void setTimeout(std::chrono::milliseconds timeout);
};

namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport

namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous

}  // namespace gloo
