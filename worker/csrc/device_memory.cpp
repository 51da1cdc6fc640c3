// Memory of the CUDA caching allocator (what torch.cuda.memory_allocated/_reserved report),
// through the device-generic allocator interface, so that it compiles without CUDA headers.
// Errors (no CUDA in this libtorch, no such device) come back as text, never as exceptions
// across the C ABI.
#include <c10/core/CachingDeviceAllocator.h>

#include "shim_error.hpp"

#include <cstddef>
#include <cstdint>

extern "C" int axial_cuda_memory(int device, int64_t* allocated, int64_t* reserved,
                                 int64_t* peak_allocated, char* err, size_t err_len) {
  try {
    const auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)
                           ->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    *peak_allocated = stats.allocated_bytes[all].peak;
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}
