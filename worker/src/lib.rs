//! The axial worker: trains the Axial-ResNet on libtorch through tch.
//!
//! - [`model`]: the network (official and seed layouts, conv baseline), its weights under
//!   PyTorch names, attention maps.
//! - [`forward`]: `axial-worker forward`, running a model on tensors from files (checking an
//!   imported checkpoint; cross-framework parity).
//! - [`error::Error`]: the crate's one error type.

pub mod error;
pub mod forward;
pub mod model;

pub use error::{Error, Result};
