//! The worker's error type. Every variant says what was being done and with which file, so a
//! user sees the whole story in one line (`main` prints the chain with `{:#}`).

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] axial_common::ConfigError),

    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A weights file does not fit the model; lists every offending key.
    #[error("{path}: the weights do not fit the model ({variant} layout):\n{report}")]
    WeightsMismatch {
        path: PathBuf,
        variant: &'static str,
        report: Box<super::model::weights::Mismatch>,
    },

    /// A tensor file lacks a tensor or holds one of the wrong shape or type.
    #[error("{path}: {message}")]
    BadTensor { path: PathBuf, message: String },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),

    /// The data could not be loaded (a loader thread died).
    #[error("data: {0}")]
    Loader(#[from] crate::data::loader::LoaderError),

    /// The group of a generation could not be formed (the rendezvous store, or the backend's
    /// set-up: an address that does not resolve, a GPU or NCCL this machine lacks).
    #[error("collective set-up failed: {0}")]
    Setup(String),

    /// The coordinator refused or could not be reached.
    #[error("coordinator: {0}")]
    Coordinator(String),

    /// The worker got SIGTERM and stopped after the checkpoint at this step (0: before
    /// training).
    #[error("terminated (SIGTERM) after the checkpoint at step {0}")]
    Terminated(u64),

    /// This generation of the group is over (aborted by the coordinator, a peer gone, the
    /// coordinator unreachable): a distributed worker joins again and resumes from the last
    /// committed checkpoint.
    #[error("the group must re-form: {0}")]
    Regroup(String),
}

impl From<crate::train::eval::EvalError> for Error {
    fn from(e: crate::train::eval::EvalError) -> Self {
        match e {
            crate::train::eval::EvalError::Loader(l) => Self::Loader(l),
            crate::train::eval::EvalError::Collective(c) => Self::Collective(c),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
