//! Types shared by the axial coordinator and worker. This crate never links libtorch, so the
//! coordinator builds in seconds and runs anywhere.
//!
//! - [`model`]: the `[model]` table of a job file ([`model::ModelSpec`], as written) and the
//!   resolved, validated [`model::ModelConfig`] that the worker builds a network from, with the
//!   presets (`axial26s`, `axial50s`, `axial50m`, `axial50l`, `seed26/38/50`, `resnet26/50`)
//!   and the per-stage geometry (channels, spatial sizes, attention spans).
//! - [`job`]: the whole job file ([`job::JobConfig`]): data, training, optimizer, schedule,
//!   checkpoints, evaluation, metrics.
//! - [`plan`]: epoch plans, per-rank step ranges and the sample ledger (exactly-once data).
//! - [`rng::Rng`]: the deterministic random streams everything reproducible draws from.
//! - [`checkpoint`]: the checkpoint folder format and its atomic commit (manifest.json).
//! - [`hparams`]: hyperparameter changes to a running job, applied by every rank at the same
//!   step.
//! - [`error::ConfigError`]: every configuration error names the key, the value and what is
//!   allowed.

pub mod checkpoint;
pub mod error;
pub mod hparams;
pub mod job;
pub mod model;
pub mod plan;
pub mod rng;

pub use error::ConfigError;
pub use job::JobConfig;
pub use model::{ModelConfig, ModelSpec, Span, Variant};
pub use rng::Rng;

/// The phases of a training step, in the order heartbeats report them (mean seconds per step
/// each) and `axial_worker_step_phase_seconds{phase}` labels them. They add up to the step:
/// `forward` and `backward` are the rank's own work, the time they spent blocked in the
/// synchronized batch norms' all-reduces (waiting for slower peers, mostly) is `sync_wait`.
pub const STEP_PHASES: [&str; 6] = [
    "data_wait",
    "forward",
    "backward",
    "allreduce_wait",
    "optimizer",
    "sync_wait",
];

/// Indexes into [`STEP_PHASES`] of the phases that wait for the other ranks: a rank's own
/// work per step (what its speed is measured by) is the rest.
pub const WAIT_PHASES: [usize; 2] = [3, 5];

/// A rank's own work per step: its phases without the waits for the other ranks.
pub fn busy_seconds(phase_seconds: &[f64; STEP_PHASES.len()]) -> f64 {
    phase_seconds
        .iter()
        .enumerate()
        .filter(|(i, _)| !WAIT_PHASES.contains(i))
        .map(|(_, s)| s)
        .sum()
}

/// Classes of the built-in procedural dataset.
pub const BUILTIN_CLASSES: i64 = 10;
