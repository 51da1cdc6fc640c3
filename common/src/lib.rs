//! Types shared by the axial coordinator and worker. This crate never links libtorch, so the
//! coordinator builds in seconds and runs anywhere.
//!
//! - [`model`]: the `[model]` table of a job file ([`model::ModelSpec`], as written) and the
//!   resolved, validated [`model::ModelConfig`] that the worker builds a network from, with the
//!   presets (`axial26s`, `axial50s`, `axial50m`, `axial50l`, `seed26/38/50`, `resnet26/50`)
//!   and the per-stage geometry (channels, spatial sizes, attention spans).
//! - [`error::ConfigError`]: every configuration error names the key, the value and what is
//!   allowed.

pub mod error;
pub mod model;

pub use error::ConfigError;
pub use model::{ModelConfig, ModelSpec, Span, Variant};
