//! Training: the step (forward, loss, backward, optimizer), the optimizers and schedule of the
//! recipe, evaluation, checkpoints, and the loop that composes them.

pub mod checkpoint;
pub mod eval;
pub mod optim;
pub mod precision;
pub mod run;
pub mod schedule;
pub mod step;

pub use step::{recipe_sgd, train_step};
