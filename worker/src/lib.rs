//! The axial worker: trains the Axial-ResNet on libtorch through tch.
//!
//! - [`model`]: the network (official and seed layouts, conv baseline), its weights under
//!   PyTorch names, attention maps.
//! - [`forward`]: `axial-worker forward`, running a model on tensors from files (checking an
//!   imported checkpoint; cross-framework parity).
//! - [`collective`]: c10d process groups (Gloo, NCCL) through the C++ shim, and DDP semantics.
//! - [`data`]: datasets (builtin, image folder, tar shards, CIFAR-10, MNIST), manifests,
//!   augmentation and the threaded loader.
//! - [`train`]: the training step and the recipe's optimizer.
//! - [`metrics`]: the worker's Prometheus metrics and `/metrics` endpoint.
//! - [`demo`]: `axial-worker demo`, a few training steps on a random batch (no data needed).
//! - [`join`]: `axial-worker join`, one rank of a distributed job; [`rendezvous`]: the
//!   coordinator's rendezvous store under c10d; [`address`]: the address a rank advertises;
//!   [`local_ranks`]: `join --local-ranks N`, one rank per GPU of a machine.
//! - [`parity`]: exact reference values (the PyTorch twin in float64) and the bound that the
//!   parity tests hold our float32 results to.
//! - [`profile`]: libtorch's operator profiler, for the benches.
//! - [`error::Error`]: the crate's one error type.

pub mod address;
pub mod collective;
pub mod commands;
pub mod data;
pub mod demo;
pub mod error;
pub mod forward;
pub mod join;
pub mod local_ranks;
pub mod metrics;
pub mod model;
pub mod parity;
pub mod profile;
pub mod rendezvous;
mod shim;
pub mod train;

pub use error::{Error, Result};

/// Keeps freed memory in the process for the next step: glibc otherwise returns a step's big
/// activation buffers to the kernel (its trim threshold) and the next step faults every page
/// in again, zeroed (`clear_page`: 3.5% of a 64 px CPU step in the profile; the step about 10%
/// faster without it, the peak RSS unchanged). Call once at start, before the first tensor.
/// A `GLIBC_TUNABLES` that sets malloc's own thresholds wins.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
    if !tuned && cfg!(all(target_os = "linux", target_env = "gnu")) {
        // SAFETY: mallopt only changes glibc's allocator parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
