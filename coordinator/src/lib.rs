//! The axial coordinator's state machines. They know nothing of gRPC or HTTP and take time as
//! an argument, so they are unit-tested without sockets or clocks.
//!
//! - [`membership::Membership`]: rendezvous, ranks, generations, lost and restarted workers.
//! - [`barrier::Barrier`]: the two-phase checkpoint (request, votes, commit or abandon).
//! - [`auth`]: the job token.
//!
//! The data plan and the sample ledger are in `axial_common::plan` (workers use them too).
//! Still to come (see the coordinator issue): the gRPC service over these, persistence of the
//! coordinator's own state, the HTTP status API and metrics, and the local launcher.

pub mod auth;
pub mod barrier;
pub mod membership;
