// libtorch's operator profiler (Kineto, CPU activities) for the benches: start, then stop and
// write every recorded operator as one tab-separated line (thread, start ns, end ns, name,
// input shapes). Errors come back as text, never as exceptions across the C ABI.
#include <torch/csrc/autograd/profiler_kineto.h>

#include "shim_error.hpp"

#include <cstddef>
#include <exception>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>

extern "C" int axial_profiler_start(int shapes, char* err, size_t err_len) {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO, shapes != 0);
    std::set<ActivityType> activities{ActivityType::CPU};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}

extern "C" int axial_profiler_stop(const char* path, char* err, size_t err_len) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    std::ofstream out(path);
    if (!out) {
      throw std::runtime_error(std::string("cannot write ") + path);
    }
    for (const auto& e : result->events()) {
      out << e.startThreadId() << '\t' << e.startNs() << '\t' << e.endNs() << '\t' << e.name()
          << '\t';
      if (e.hasShapes()) {
        bool first = true;
        for (const auto& s : e.shapes()) {
          out << (first ? "" : " ") << '[';
          for (size_t i = 0; i < s.size(); ++i) {
            out << (i ? "," : "") << s[i];
          }
          out << ']';
          first = false;
        }
      }
      out << '\n';
    }
    out.flush();
    if (!out.good()) {
      throw std::runtime_error(std::string("write failed: ") + path);
    }
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}
