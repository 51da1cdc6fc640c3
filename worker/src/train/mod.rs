//! Training: the step (forward, loss, backward, optimizer) and the recipe's optimizer.

pub mod step;

pub use step::{sgd, train_step};
