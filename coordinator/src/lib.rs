//! The axial coordinator's state machines. They know nothing of gRPC or HTTP and take time as
//! an argument, so they are unit-tested without sockets or clocks.
//!
//! - [`membership::Membership`]: rendezvous, ranks, generations, lost and restarted workers.
//! - [`barrier::Barrier`]: the two-phase checkpoint (request, votes, commit or abandon).
//! - [`auth`]: the job token.
//! - [`rendezvous::Rendezvous`]: the collective's key-value store for the running generation
//!   (what c10d's process groups bootstrap through), served to that generation's ranks only.
//! - [`job::JobState`]: the job's state, composing the above with the committed checkpoint
//!   (the durable state is the checkpoints on disk).
//! - [`service`]: the gRPC service over `JobState` (tonic), behind a token interceptor.
//! - [`http`]: `/metrics` and `/api/status`; [`metrics`]: the Prometheus metrics.
//! - [`launch`]: serving, and the local launcher (coordinator + N worker processes).
//!
//! The data plan and the sample ledger are in `axial_common::plan` (workers use them too).

pub mod auth;
pub mod barrier;
pub mod http;
pub mod job;
pub mod launch;
pub mod membership;
pub mod metrics;
pub mod rendezvous;
pub mod service;
pub mod simulate;
