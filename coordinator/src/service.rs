//! The gRPC service: translates `axial.v1.Coordinator` calls into calls on [`JobState`] and
//! back. Authentication (the job token) is an interceptor in front of it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axial_common::checkpoint::{FileEntry, Position};
use axial_common::hparams;
use axial_proto::v1::coordinator_server::Coordinator;
use axial_proto::v1::{
    self, HeartbeatReply, HeartbeatRequest, HyperParameterChange, JoinReply, JoinRequest,
    LeaveReply, LeaveRequest, StoreReply, StoreRequest, VoteReply, VoteRequest,
    store_request::Op as WireOp,
};
use tonic::{Request, Response, Status};

use crate::job::{Cast, JobState, Join, Report, StoreRefused, Voter};
use crate::membership::HeartbeatReply as Hb;
use crate::rendezvous::{Op, Outcome, StoreError};

/// The longest a store call may wait for keys (its client asks again for longer waits).
const MAX_STORE_WAIT: Duration = Duration::from_secs(30);
/// The longest a join may be held waiting for a group to form (below the call deadline).
const MAX_JOIN_WAIT: Duration = Duration::from_secs(5);
/// Keys one CHECK or WAIT may name.
const MAX_STORE_KEYS: usize = 4096;

#[derive(Debug, Clone)]
pub struct Service {
    pub state: Arc<Mutex<JobState>>,
    start: Instant,
    /// Woken whenever the rendezvous store changes (store calls waiting for keys).
    store_changed: Arc<tokio::sync::Notify>,
    /// Woken whenever the generation changes (joins held waiting for a group to form).
    generation_changed: Arc<tokio::sync::Notify>,
    /// Held while a commit is written (outside the state lock): one commit at a time.
    commit_io: Arc<tokio::sync::Mutex<()>>,
    /// Store calls refused to non-members so far (logged at powers of two, not each).
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl Service {
    pub fn new(state: JobState) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            start: Instant::now(),
            store_changed: Arc::new(tokio::sync::Notify::new()),
            generation_changed: Arc::new(tokio::sync::Notify::new()),
            commit_io: Arc::new(tokio::sync::Mutex::new(())),
            refused: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Milliseconds since the service started (the state machines' clock).
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One look at a join: the assignment, finished, or wait (`Status::Wait`, the default).
    fn join_once(&self, r: &JoinRequest, abandoned: Option<(u64, &str)>) -> JoinReply {
        let now = self.now();
        let mut state = self.lock();
        let before = state.generation();
        state.set_host(&r.worker_id, &r.host);
        let reply = match state.join(&r.worker_id, r.incarnation, abandoned, now) {
            Join::Wait => JoinReply::default(),
            Join::Finished => JoinReply {
                status: v1::join_reply::Status::Finished as i32,
                ..Default::default()
            },
            Join::Stopped => JoinReply {
                status: v1::join_reply::Status::Stopped as i32,
                ..Default::default()
            },
            Join::Assigned { assignment, resume } => JoinReply {
                status: v1::join_reply::Status::Assigned as i32,
                rank: assignment.rank as u32,
                world: assignment.world as u32,
                generation: assignment.generation,
                job_toml: state.job_toml.clone(),
                resume: resume.map(|c| v1::Resume {
                    epoch: c.position.epoch,
                    consumed: c.position.consumed,
                    step: c.position.step,
                    checkpoint: c.folder.display().to_string(),
                }),
                changes: state.changes().iter().map(Into::into).collect(),
            },
        };
        if state.generation() != before {
            self.generation_changed.notify_waiters();
        }
        reply
    }

    /// Lets time pass (`JobState::tick`), waking the joins held waiting if a group formed or
    /// ended. Returns whether the job is over (done or failed), with the log lines after
    /// `printed` printed.
    pub fn tick(&self, printed: &mut usize) -> bool {
        let now = self.now();
        let mut state = self.lock();
        let before = state.generation();
        state.tick(now);
        if state.generation() != before {
            self.generation_changed.notify_waiters();
        }
        for line in &state.log[*printed..] {
            eprintln!("coordinator: {line}");
        }
        *printed = state.log.len();
        state.done() || state.failed().is_some()
    }
}

/// Whether `host` names this machine's loopback interface.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// A worker that reaches the coordinator over the network but advertises a loopback address
/// for the collective: no other host could reach it, and the group would never form.
fn check_advertised(worker: &str, host: &str, peer: Option<SocketAddr>) -> Result<(), Status> {
    match peer {
        Some(peer) if !peer.ip().to_canonical().is_loopback() && is_loopback_host(host) => {
            Err(Status::invalid_argument(format!(
                "{worker} advertises {host}, a loopback address, for the collective's traffic \
                 but reaches the coordinator from {peer}: ranks on other hosts could not reach \
                 it; give `join --host` this worker's own address, or leave --host out (the \
                 local address of the route to the coordinator is used)"
            )))
        }
        _ => Ok(()),
    }
}

fn store_status(e: StoreRefused) -> Status {
    match e {
        StoreRefused::Stale { .. } => Status::failed_precondition(e.to_string()),
        StoreRefused::NotMember { .. } => Status::permission_denied(e.to_string()),
        StoreRefused::Store(StoreError::Invalid(m)) => Status::invalid_argument(m),
        StoreRefused::Store(StoreError::Full(m)) => Status::resource_exhausted(m),
    }
}

/// The request's operation, its keys checked.
fn store_op(r: &StoreRequest) -> Result<Op, Status> {
    let op = WireOp::try_from(r.op)
        .map_err(|_| Status::invalid_argument(format!("unknown store operation {}", r.op)))?;
    let one = || match r.keys.as_slice() {
        [key] => Ok(key.clone()),
        keys => Err(Status::invalid_argument(format!(
            "store {op:?} takes one key, not {}",
            keys.len()
        ))),
    };
    let many = || {
        if r.keys.is_empty() || r.keys.len() > MAX_STORE_KEYS {
            Err(Status::invalid_argument(format!(
                "store {op:?} takes 1..={MAX_STORE_KEYS} keys, not {}",
                r.keys.len()
            )))
        } else {
            Ok(r.keys.clone())
        }
    };
    Ok(match op {
        WireOp::Set => Op::Set {
            key: one()?,
            value: r.value.clone(),
        },
        WireOp::Get => Op::Get { key: one()? },
        WireOp::Add => Op::Add {
            key: one()?,
            amount: r.amount,
        },
        WireOp::Check | WireOp::Wait => Op::Check { keys: many()? },
        WireOp::Delete => Op::Delete { key: one()? },
        WireOp::CompareSet => Op::CompareSet {
            key: one()?,
            expected: r.expected.clone(),
            value: r.value.clone(),
        },
        WireOp::NumKeys => Op::NumKeys,
    })
}

/// The interceptor: every call must carry `authorization: Bearer <token>`. Refusals are
/// logged at powers of two (a flood of them does not flood the log).
pub fn authenticate(
    token: String,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    move |req: Request<()>| {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match crate::auth::check(header, &token) {
            Ok(()) => Ok(req),
            Err(e) => {
                let n = 1 + refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n.is_power_of_two() {
                    eprintln!(
                        "coordinator: refused a call from {:?}: {e} ({n} refused so far)",
                        req.remote_addr()
                    );
                }
                Err(Status::unauthenticated(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        if let Err(refused) = check_advertised(&r.worker_id, &r.host, peer) {
            eprintln!("coordinator: refused a join: {}", refused.message());
            return Err(refused);
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(r.wait_ms)).min(MAX_JOIN_WAIT);
        let mut abandoned =
            (r.abandoned_generation != 0).then_some((r.abandoned_generation, r.reason.as_str()));
        loop {
            // Registered before looking, so a group formed meanwhile still wakes this call.
            let changed = self.generation_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let reply = self.join_once(&r, abandoned.take());
            if reply.status != v1::join_reply::Status::Wait as i32
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(Response::new(reply));
            }
            // Look again when the generation changes, and every second (which also keeps
            // this waiting worker seen, as a join does).
            let slice = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(slice, changed).await;
        }
    }

    async fn store(&self, request: Request<StoreRequest>) -> Result<Response<StoreReply>, Status> {
        let peer = request.remote_addr();
        let r = request.into_inner();
        let op = store_op(&r)?;
        let waits = matches!(WireOp::try_from(r.op), Ok(WireOp::Get) | Ok(WireOp::Wait));
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(r.wait_ms)).min(MAX_STORE_WAIT);
        loop {
            // Registered before looking, so a change made meanwhile still wakes this call.
            let changed = self.store_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let outcome = self
                .lock()
                .store(&r.worker_id, r.generation, op.clone())
                .map_err(|e| {
                    if matches!(e, StoreRefused::NotMember { .. }) {
                        let n = 1 + self
                            .refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n.is_power_of_two() {
                            eprintln!(
                                "coordinator: refused a store call from {peer:?}: {e} ({n} refused so far)"
                            );
                        }
                    }
                    store_status(e)
                })?;
            let reply = match outcome {
                Outcome::Done => StoreReply::default(),
                Outcome::Value(Some(value)) => StoreReply {
                    value,
                    found: true,
                    ..Default::default()
                },
                Outcome::Value(None) => StoreReply::default(),
                Outcome::Number(number) => StoreReply {
                    number,
                    ..Default::default()
                },
                Outcome::Flag(flag) => StoreReply {
                    number: i64::from(flag),
                    ..Default::default()
                },
            };
            let ready = !waits || reply.found || reply.number == 1;
            if !waits {
                self.store_changed.notify_waiters();
            }
            if ready || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(reply));
            }
            // Look again on a change, and at least every second (the generation may end).
            let slice = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(slice, changed).await;
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = request.into_inner();
        let now = self.now();
        let mut state = self.lock();
        let reply = state.heartbeat(&r.worker_id, r.generation, now);
        if matches!(reply, Hb::Ok) && r.phase == "train" {
            let mut phase_seconds = [0.0; axial_common::STEP_PHASES.len()];
            for (slot, v) in phase_seconds.iter_mut().zip(&r.phase_seconds) {
                *slot = if v.is_finite() { v.max(0.0) } else { 0.0 };
            }
            let report = Report {
                step: r.step,
                loss: r.loss,
                images_per_second: r.images_per_second,
                lr: r.lr,
                total_steps: r.total_steps,
                phase_seconds,
                eval: (r.eval_epoch > 0).then_some((r.eval_epoch, r.eval_top1)),
                at: now,
            };
            state.record_report(&r.worker_id, report, now);
        }
        if matches!(reply, Hb::Ok) && r.phase == "terminating" {
            state.terminating(&r.worker_id);
        }
        let reply = match reply {
            Hb::Ok => HeartbeatReply {
                changes: state.changes().iter().map(Into::into).collect(),
                drain_at_step: state.drain_at().unwrap_or(0),
                stop: state.failed().is_some(),
                shares: state.shares_for(r.generation).map(|s| v1::BatchShares {
                    generation: s.generation,
                    from_step: s.from_step,
                    samples: s.samples.clone(),
                }),
                ..Default::default()
            },
            Hb::Abort { .. } => HeartbeatReply {
                abort: true,
                ..Default::default()
            },
            Hb::UnknownWorker => {
                return Err(Status::not_found(format!(
                    "{} is not a member; join first",
                    r.worker_id
                )));
            }
        };
        Ok(Response::new(reply))
    }

    async fn vote(&self, request: Request<VoteRequest>) -> Result<Response<VoteReply>, Status> {
        let r = request.into_inner();
        let now = self.now();
        let cast = {
            let mut state = self.lock();
            // The rank comes from the membership, not from the caller.
            let Some(rank) = state.rank_of(&r.worker_id) else {
                return Err(Status::failed_precondition(
                    "not a member of the running group",
                ));
            };
            let pos: Position = serde_json::from_str(&r.position_json)
                .map_err(|e| Status::invalid_argument(format!("position_json: {e}")))?;
            if (pos.step, pos.epoch, pos.consumed) != (r.step, r.epoch, r.consumed) {
                return Err(Status::invalid_argument(
                    "position_json disagrees with step/epoch/consumed",
                ));
            }
            let files = r
                .files
                .iter()
                .map(|f| FileEntry {
                    name: f.path.clone(),
                    sha256: f.sha256.clone(),
                    bytes: f.bytes,
                })
                .collect();
            let folder = (!r.folder.is_empty()).then(|| std::path::PathBuf::from(&r.folder));
            let voter = Voter {
                rank,
                generation: r.generation,
                for_group: r.for_group,
            };
            state.cast_vote(voter, pos, folder, files, now)
        };
        let v = match cast {
            Cast::Done(v) => v,
            // The last vote: the commit is written off the state lock (heartbeats go on
            // meanwhile; no group forms until it is in), on a task of its own that runs to
            // the end even when this request is dropped (its deadline passed, rank 0's
            // connection reset): the files, the manifest and the committed pointer are one
            // unit. Old checkpoints are pruned after, best effort.
            Cast::Commit(c) => {
                eprintln!(
                    "coordinator: writing the commit of step {}",
                    c.position.step
                );
                let svc = self.clone();
                tokio::spawn(async move {
                    let _one_at_a_time = svc.commit_io.lock().await;
                    let (c, written, pruned) = tokio::task::spawn_blocking(move || {
                        let written = c.write();
                        let pruned = written.as_ref().ok().map(|()| c.prune());
                        (c, written, pruned)
                    })
                    .await
                    .map_err(|e| format!("the commit's writer: {e}"))?;
                    let now = svc.now();
                    let v = {
                        let mut s = svc.lock();
                        let v = s.finish_commit(c, written, now);
                        if let Some(p) = pruned {
                            s.finish_pruning(p);
                        }
                        v
                    };
                    // Joins held while the commit was written may form a group now.
                    svc.generation_changed.notify_waiters();
                    Ok::<_, String>(v)
                })
                .await
                .map_err(|e| Status::internal(format!("the commit's task: {e}")))?
                .map_err(Status::internal)?
            }
        };
        Ok(Response::new(VoteReply {
            accepted: v.accepted,
            reason: v.reason,
            committed: v.committed,
        }))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let r = request.into_inner();
        let now = self.now();
        if !r.finished && !r.reason.is_empty() {
            eprintln!("coordinator: {} gave up: {}", r.worker_id, r.reason);
        }
        self.lock().leave(&r.worker_id, r.finished, &r.reason, now);
        Ok(Response::new(LeaveReply {}))
    }

    async fn set_hyper_parameters(
        &self,
        request: Request<HyperParameterChange>,
    ) -> Result<Response<HyperParameterChange>, Status> {
        let change = hparams::HyperParameterChange::from(request.get_ref());
        let now = self.now();
        let accepted = self
            .lock()
            .set_hyperparameters(change, now)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(HyperParameterChange::from(&accepted)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MembershipConfig;
    use axial_common::checkpoint;

    /// A vote whose request is dropped (its deadline passed while a slow commit was being
    /// written, or rank 0's connection reset) still commits: the files, the manifest and the
    /// committed pointer are one unit, on a task of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_vote_still_commits_as_one_unit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n[checkpoint]\ndir = \"{}\"\nkeep = 1\n",
            tmp.path().display()
        );
        let job =
            axial_common::JobConfig::parse(&text, "test", std::path::Path::new("/")).expect("job");
        let members = MembershipConfig {
            min: 1,
            max: 1,
            settle_ms: 0,
            timeout_ms: 10_000,
        };
        let mut state = JobState::new(job, members, false).expect("state");
        state.set_commit_delay(600, None);
        let crate::job::Join::Assigned { assignment, .. } = state.join("a", 1, None, 0) else {
            panic!("group")
        };
        let g = assignment.generation;
        let service = Service::new(state);
        let staging = tmp.path().join(checkpoint::staging_name(g, 4));
        std::fs::create_dir_all(&staging).expect("mkdir");
        for name in checkpoint::FILES {
            std::fs::write(staging.join(name), name.as_bytes()).expect("write");
        }
        let files = checkpoint::describe(&staging, &checkpoint::FILES)
            .expect("describe")
            .into_iter()
            .map(|f| v1::FileEntry {
                path: f.name,
                sha256: f.sha256,
                bytes: f.bytes,
            })
            .collect();
        let pos = Position {
            step: 4,
            consumed: 32,
            samples_seen: 32,
            loss_scale: 1.0,
            ..Position::default()
        };
        let request = Request::new(VoteRequest {
            worker_id: "a".into(),
            generation: g,
            step: 4,
            epoch: 0,
            consumed: 32,
            files,
            folder: staging.display().to_string(),
            position_json: serde_json::to_string(&pos).expect("json"),
            for_group: true,
        });
        // The caller gives up long before the commit is written.
        let dropped = tokio::time::timeout(Duration::from_millis(100), service.vote(request)).await;
        assert!(dropped.is_err(), "the vote returned before the slow commit");
        assert!(service.lock().committed().is_none(), "not yet");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let committed = service
            .lock()
            .committed()
            .cloned()
            .expect("committed anyway");
        assert_eq!(committed.position.step, 4);
        checkpoint::verify(&committed.folder).expect("the committed folder verifies");
        assert_eq!(
            committed.folder,
            tmp.path().join(checkpoint::folder_name(4))
        );
    }
}
