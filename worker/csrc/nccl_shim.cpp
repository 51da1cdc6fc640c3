// ProcessGroupNCCL for CUDA tensors, behind the same handle as the Gloo group (group.hpp), so
// that every collective of c10d_shim.cpp runs on either backend. Compiled into every build made
// against the CUDA libtorch (build.rs defines AXIAL_WITH_NCCL when the CUDA and NCCL headers
// are present); without them `axial_nccl_new` says why instead.
#include "group.hpp"

#ifdef AXIAL_WITH_NCCL
#define USE_C10D_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

extern "C" {

// 1 when this build has the NCCL backend.
int axial_nccl_compiled() {
#ifdef AXIAL_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins an NCCL group through `store` on CUDA device `device`: the device becomes this
// thread's current one and the group is bound to it (as init_process_group(device_id=...)
// does), so that several ranks on one machine each use their own GPU, and the communicator is
// created at once rather than at the first collective. Returns nullptr on error (no GPU, no
// NCCL in this build, ...).
void* axial_nccl_new(void* store, int rank, int world, int device, int64_t timeout_ms,
                     char* err, size_t err_len) {
  axial::Group* group = nullptr;
  axial::guarded(err, err_len, [&] {
#ifdef AXIAL_WITH_NCCL
    auto s = c10::intrusive_ptr<c10d::Store>::unsafe_reclaim_from_nonowning(
        static_cast<c10d::Store*>(store));
    int count = static_cast<int>(c10::cuda::device_count());
    if (device < 0 || device >= count) {
      throw std::runtime_error("NCCL: this machine has no GPU cuda:" + std::to_string(device) +
                               " (" + std::to_string(count) + " CUDA devices)");
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, world, options);
    at::Device bound(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    pg->setBoundDeviceId(bound);
    pg->eagerConnectSingleDevice(bound);
    group = new axial::Group{s, pg, std::chrono::milliseconds(timeout_ms), false};
#else
    (void)store;
    (void)rank;
    (void)world;
    (void)device;
    (void)timeout_ms;
    throw std::runtime_error(
        "this build has no NCCL backend: it was compiled without the CUDA and NCCL headers "
        "(install the full torch wheel with scripts/setup-libtorch.sh, not AXIAL_TORCH_SLIM=1, and rebuild)");
#endif
  });
  return group;
}

}  // extern "C"
