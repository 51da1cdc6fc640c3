// Autocast dtype for CUDA: tch exposes autocast on/off but not its dtype (fp16 by default), so
// bf16 autocast needs this one call into ATen. Errors come back as text, never as exceptions
// across the C ABI.
#include <ATen/autocast_mode.h>

#include <cstddef>
#include <cstring>
#include <exception>

extern "C" int axial_set_cuda_autocast_dtype(int bf16, char* err, size_t err_len) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf);
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}

