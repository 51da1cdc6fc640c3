//! Training: the step (`step`: forward, loss, backward, the update; the one function the loop,
//! `demo` and the benchmarks run), the optimizers and schedule of the recipe, evaluation,
//! checkpoints (`checkpoint`: the files; `checkpointer`: in the loop), the distributed side
//! (`coordination`), and the loop that composes them (`run` sets a run up, `training` runs its epochs). The per-rank plan of each step is
//! `axial_common::plan::StepPlan::micro_batches`.

pub mod checkpoint;
mod checkpointer;
pub mod coordination;
pub mod eval;
pub mod graph;
pub mod optim;
pub mod precision;
mod progress;
pub mod run;
mod sample_log;
pub mod schedule;
pub mod step;
mod training;

pub use step::{recipe_sgd, train_step};
