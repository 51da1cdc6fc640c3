// Autocast dtype for CUDA: tch exposes autocast on/off but not its dtype (fp16 by default), so
// bf16 autocast needs this one call into ATen. Errors come back as text, never as exceptions
// across the C ABI.
#include <ATen/autocast_mode.h>

#include "shim_error.hpp"

#include <cstddef>

extern "C" int axial_set_cuda_autocast_dtype(int bf16, char* err, size_t err_len) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf);
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}

