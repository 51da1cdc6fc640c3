//! Membership and rendezvous: which workers form the group, their ranks, and the generation
//! number that changes with every change of membership. A plain state machine: time comes in
//! as an argument (milliseconds on any monotonic clock), nothing here knows of gRPC.
//!
//! - Workers join with an id and an incarnation (a nonce per process start). The group forms
//!   when `max` workers are waiting, or when at least `min` are and no one joined for
//!   `settle_ms`.
//! - A repeated join (same id, same incarnation) is idempotent: it gets the same answer.
//! - A join from a new id while a group runs is parked as a standby; it does not disturb the
//!   running generation.
//! - A join from a member's id with a new incarnation means that member's process restarted:
//!   the generation is aborted and the group forms again.
//! - A member whose heartbeats stop for `timeout_ms` is lost: the generation is aborted, the
//!   survivors (and standbys) rendezvous again.
//! - A member that reports a failed generation (a collective whose peer died, a lost
//!   coordinator) ends it at once: the group re-forms in seconds, not after a heartbeat timeout.
//! - After an abort only workers that join again count: a member that died with the old
//!   generation is not given a rank in the new one (it joins later as a standby, if it comes
//!   back).
//! - Generations only grow, across restarts of the coordinator too ([`Membership::resume`]):
//!   a vote or heartbeat from before the restart can never pass for a current one.
//! - Heartbeats and votes from an older generation are told to abort.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipConfig {
    pub min: usize,
    pub max: usize,
    pub settle_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub rank: usize,
    pub world: usize,
    pub generation: u64,
}

/// The answer to a join or a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinReply {
    /// Wait and ask again (rendezvous not complete, or parked as a standby).
    Wait,
    Assigned(Assignment),
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatReply {
    Ok,
    /// The sender's generation is over: abort collectives and join again.
    Abort {
        current: u64,
    },
    /// Not a member: join first.
    UnknownWorker,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    incarnation: u64,
    last_seen: u64,
    rank: Option<usize>,
    /// Joined since the last abort (only such members are given ranks).
    #[serde(default)]
    ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Rendezvous,
    Running,
}

/// Something that happened, for the status API and the logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Formed {
        generation: u64,
        world: usize,
    },
    Lost {
        worker: String,
        generation: u64,
    },
    Restarted {
        worker: String,
        generation: u64,
    },
    Standby {
        worker: String,
    },
    Left {
        worker: String,
    },
    Failed {
        worker: String,
        generation: u64,
        reason: String,
    },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Formed { generation, world } => {
                write!(f, "Formed: generation {generation}, world: {world}")
            }
            Event::Lost { worker, generation } => {
                write!(f, "Lost: {worker} (generation {generation})")
            }
            Event::Restarted { worker, generation } => {
                write!(f, "Restarted: {worker} (generation {generation})")
            }
            Event::Standby { worker } => write!(f, "Standby: {worker}"),
            Event::Left { worker } => write!(f, "Left: {worker}"),
            Event::Failed {
                worker,
                generation,
                reason,
            } => write!(f, "Failed: {worker} in generation {generation}: {reason}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Membership {
    config: MembershipConfig,
    phase: Phase,
    generation: u64,
    members: BTreeMap<String, Member>,
    standby: BTreeMap<String, Member>,
    /// Members with `ready` set: kept as they change, so a join is O(log n), not a scan.
    #[serde(skip)]
    ready: usize,
    last_join: u64,
    events: Vec<Event>,
}

impl Membership {
    pub fn new(config: MembershipConfig) -> Self {
        Self {
            config,
            phase: Phase::Rendezvous,
            generation: 0,
            members: BTreeMap::new(),
            standby: BTreeMap::new(),
            ready: 0,
            last_join: 0,
            events: Vec::new(),
        }
    }

    /// A membership that goes on from `generation` (the last one a previous coordinator of
    /// this job used): every generation it forms is newer.
    pub fn resume(config: MembershipConfig, generation: u64) -> Self {
        Self {
            generation,
            ..Self::new(config)
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn world(&self) -> usize {
        match self.phase {
            Phase::Running => self.members.len(),
            Phase::Rendezvous => 0,
        }
    }

    /// Events since the last call.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn join(&mut self, worker: &str, incarnation: u64, now: u64) -> JoinReply {
        match self.phase {
            Phase::Rendezvous => {
                let fresh = self
                    .members
                    .get(worker)
                    .is_none_or(|m| m.incarnation != incarnation);
                if fresh {
                    self.last_join = now;
                }
                self.standby.remove(worker);
                let before = self.members.insert(
                    worker.to_owned(),
                    Member {
                        incarnation,
                        last_seen: now,
                        rank: None,
                        ready: true,
                    },
                );
                if !before.is_some_and(|m| m.ready) {
                    self.ready += 1;
                }
                self.try_form(now);
                self.assignment(worker)
            }
            Phase::Running => match self.members.get_mut(worker) {
                Some(m) if m.incarnation == incarnation => {
                    m.last_seen = now;
                    self.assignment(worker)
                }
                Some(_) => {
                    self.events.push(Event::Restarted {
                        worker: worker.to_owned(),
                        generation: self.generation,
                    });
                    self.abort_generation(now);
                    self.join(worker, incarnation, now)
                }
                None => {
                    if !self.standby.contains_key(worker) {
                        self.events.push(Event::Standby {
                            worker: worker.to_owned(),
                        });
                    }
                    self.standby.insert(
                        worker.to_owned(),
                        Member {
                            incarnation,
                            last_seen: now,
                            rank: None,
                            ready: false,
                        },
                    );
                    JoinReply::Wait
                }
            },
        }
    }

    fn assignment(&self, worker: &str) -> JoinReply {
        match (self.phase, self.members.get(worker).and_then(|m| m.rank)) {
            (Phase::Running, Some(rank)) => JoinReply::Assigned(Assignment {
                rank,
                world: self.members.len(),
                generation: self.generation,
            }),
            _ => JoinReply::Wait,
        }
    }

    fn try_form(&mut self, now: u64) {
        let n = self.ready;
        debug_assert_eq!(n, self.members.values().filter(|m| m.ready).count());
        let settled = now.saturating_sub(self.last_join) >= self.config.settle_ms;
        if self.phase == Phase::Rendezvous
            && (n >= self.config.max || (n >= self.config.min && settled))
        {
            // Members that have not joined since the abort wait as standbys.
            let absent: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| !m.ready)
                .map(|(id, _)| id.clone())
                .collect();
            for id in absent {
                if let Some(m) = self.members.remove(&id) {
                    self.standby.insert(id, m);
                }
            }
            self.generation += 1;
            // Ranks in id order: deterministic, and stable for a group that re-forms unchanged.
            for (rank, m) in self.members.values_mut().enumerate() {
                m.rank = Some(rank);
                m.last_seen = now;
            }
            self.phase = Phase::Running;
            self.events.push(Event::Formed {
                generation: self.generation,
                world: n,
            });
        }
    }

    /// Ends the running generation; members (and standbys) rendezvous again.
    fn abort_generation(&mut self, now: u64) {
        self.phase = Phase::Rendezvous;
        self.generation += 1;
        let standby = std::mem::take(&mut self.standby);
        self.members.extend(standby);
        for m in self.members.values_mut() {
            m.rank = None;
            m.ready = false;
        }
        self.ready = 0;
        self.last_join = now;
        // Over max after adding standbys: keep the first max (by id), park the rest.
        while self.members.len() > self.config.max {
            if let Some((id, m)) = self.members.pop_last() {
                self.standby.insert(id, m);
            }
        }
    }

    /// `worker` gave up `generation` (a collective failed, or it lost the coordinator): if that
    /// is the running one, it ends now and the group re-forms.
    pub fn report_failure(&mut self, worker: &str, generation: u64, reason: &str, now: u64) {
        if self.is_current(generation) && self.members.contains_key(worker) {
            self.events.push(Event::Failed {
                worker: worker.to_owned(),
                generation,
                reason: reason.to_owned(),
            });
            self.abort_generation(now);
        }
    }

    /// Ends the running generation for a reason of the coordinator's own (a stalled group).
    pub fn end_generation(&mut self, reason: &str, now: u64) {
        if self.phase == Phase::Running {
            self.events.push(Event::Failed {
                worker: "coordinator".into(),
                generation: self.generation,
                reason: reason.to_owned(),
            });
            self.abort_generation(now);
        }
    }

    /// Lets time pass: forms a settled group, declares silent members lost.
    pub fn tick(&mut self, now: u64) {
        match self.phase {
            Phase::Rendezvous => {
                let timeout = self.config.timeout_ms;
                let before = self.members.len();
                self.members
                    .retain(|_, m| now.saturating_sub(m.last_seen) < timeout);
                if self.members.len() != before {
                    self.ready = self.members.values().filter(|m| m.ready).count();
                }
                self.try_form(now);
            }
            Phase::Running => {
                let lost: Vec<String> = self
                    .members
                    .iter()
                    .filter(|(_, m)| now.saturating_sub(m.last_seen) >= self.config.timeout_ms)
                    .map(|(id, _)| id.clone())
                    .collect();
                if !lost.is_empty() {
                    for id in &lost {
                        self.members.remove(id);
                        self.events.push(Event::Lost {
                            worker: id.clone(),
                            generation: self.generation,
                        });
                    }
                    self.abort_generation(now);
                }
            }
        }
    }

    pub fn heartbeat(&mut self, worker: &str, generation: u64, now: u64) -> HeartbeatReply {
        let Some(m) = self.members.get_mut(worker) else {
            if let Some(s) = self.standby.get_mut(worker) {
                s.last_seen = now;
                return HeartbeatReply::Abort {
                    current: self.generation,
                };
            }
            return HeartbeatReply::UnknownWorker;
        };
        m.last_seen = now;
        if generation != self.generation || self.phase != Phase::Running {
            return HeartbeatReply::Abort {
                current: self.generation,
            };
        }
        HeartbeatReply::Ok
    }

    /// A worker leaves on purpose (end of job or scale-down).
    pub fn leave(&mut self, worker: &str, now: u64) {
        self.standby.remove(worker);
        if let Some(m) = self.members.remove(worker) {
            self.ready -= usize::from(m.ready);
            self.events.push(Event::Left {
                worker: worker.to_owned(),
            });
            if self.phase == Phase::Running {
                self.abort_generation(now);
            }
        }
    }

    /// Drops `worker` without an event (a joiner told that the job has finished).
    pub fn forget(&mut self, worker: &str) {
        if let Some(m) = self.members.remove(worker) {
            self.ready -= usize::from(m.ready);
        }
        self.standby.remove(worker);
    }

    /// Whether `worker` is a member or a standby.
    pub fn knows(&self, worker: &str) -> bool {
        self.members.contains_key(worker) || self.standby.contains_key(worker)
    }

    /// Members (with a rank or joining the next group), standbys not counted.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Members and standbys: (id, rank if running, last seen, standby).
    pub fn workers(&self) -> Vec<(String, Option<usize>, u64, bool)> {
        let members = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.rank, m.last_seen, false));
        let standby = self
            .standby
            .iter()
            .map(|(id, m)| (id.clone(), None, m.last_seen, true));
        members.chain(standby).collect()
    }

    /// The running assignment of `worker`, if it is a member of the running group.
    pub fn assignment_of(&self, worker: &str) -> Option<Assignment> {
        match self.assignment(worker) {
            JoinReply::Assigned(a) => Some(a),
            JoinReply::Wait => None,
        }
    }

    /// Whether `generation` is the running one (for checkpoint votes and leases).
    pub fn is_current(&self, generation: u64) -> bool {
        self.phase == Phase::Running && generation == self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MembershipConfig {
        MembershipConfig {
            min: 2,
            max: 3,
            settle_ms: 1000,
            timeout_ms: 5000,
        }
    }

    fn assigned(r: JoinReply) -> Assignment {
        match r {
            JoinReply::Assigned(a) => a,
            JoinReply::Wait => panic!("expected an assignment"),
        }
    }

    #[test]
    fn forms_at_max_at_once_or_at_min_after_settling() {
        let mut m = Membership::new(config());
        assert_eq!(m.join("a", 1, 0), JoinReply::Wait);
        assert_eq!(m.join("b", 1, 10), JoinReply::Wait);
        m.tick(500);
        assert_eq!(m.phase(), Phase::Rendezvous, "not settled yet");
        m.tick(1010);
        assert_eq!(m.phase(), Phase::Running);
        let a = assigned(m.join("a", 1, 1020));
        let b = assigned(m.join("b", 1, 1020));
        assert_eq!((a.rank, b.rank, a.world, a.generation), (0, 1, 2, 1));

        let mut m = Membership::new(config());
        m.join("x", 1, 0);
        m.join("y", 1, 0);
        let z = assigned(m.join("z", 1, 0));
        assert_eq!((z.rank, z.world), (2, 3));
    }

    #[test]
    fn duplicate_join_is_idempotent() {
        let mut m = Membership::new(config());
        m.join("a", 7, 0);
        m.join("a", 7, 1);
        m.join("b", 1, 2);
        m.join("a", 7, 3);
        assert_eq!(m.members.len(), 2);
        m.tick(2000);
        let first = assigned(m.join("a", 7, 2001));
        assert_eq!(assigned(m.join("a", 7, 2002)), first);
        assert_eq!(m.generation(), 1);
    }

    #[test]
    fn late_join_is_parked_and_restart_reforms() {
        let mut m = Membership::new(config());
        m.join("a", 1, 0);
        m.join("b", 1, 0);
        m.tick(1000);
        assert_eq!(m.generation(), 1);
        // A newcomer while running: standby, the generation goes on.
        assert_eq!(m.join("c", 1, 1100), JoinReply::Wait);
        assert_eq!(m.heartbeat("a", 1, 1100), HeartbeatReply::Ok);
        assert_eq!(m.generation(), 1);
        // b's process restarts (new incarnation): the generation is aborted; a learns it from
        // its next heartbeat, joins again, and with the standby's next poll the group is at
        // max and re-forms at once.
        assert_eq!(m.join("b", 2, 1200), JoinReply::Wait);
        assert_eq!(
            m.heartbeat("a", 1, 1201),
            HeartbeatReply::Abort { current: 2 }
        );
        assert_eq!(m.join("a", 1, 1202), JoinReply::Wait);
        let c = assigned(m.join("c", 1, 1203));
        let b = assigned(m.join("b", 2, 1204));
        assert_eq!((b.world, c.world), (3, 3));
        assert_eq!(b.generation, 3);
        let events = m.drain_events();
        assert!(events.contains(&Event::Restarted {
            worker: "b".into(),
            generation: 1
        }));
        assert!(events.contains(&Event::Standby { worker: "c".into() }));
    }

    #[test]
    fn silent_member_is_lost_and_survivors_reform() {
        let mut m = Membership::new(config());
        m.join("a", 1, 0);
        m.join("b", 1, 0);
        m.join("c", 1, 0);
        assert_eq!(m.generation(), 1);
        m.heartbeat("a", 1, 4000);
        m.heartbeat("b", 1, 4000);
        m.tick(5000); // c silent since 0
        assert_eq!(m.phase(), Phase::Rendezvous);
        assert!(m.drain_events().contains(&Event::Lost {
            worker: "c".into(),
            generation: 1
        }));
        // Votes and heartbeats of generation 1 are stale now.
        assert!(!m.is_current(1));
        assert_eq!(
            m.heartbeat("a", 1, 5001),
            HeartbeatReply::Abort { current: 2 }
        );
        m.join("a", 1, 5002);
        m.join("b", 1, 5002);
        m.tick(6100);
        let a = assigned(m.join("a", 1, 6100));
        assert_eq!((a.world, a.generation), (2, 3));
        assert_eq!(m.heartbeat("zz", 3, 6100), HeartbeatReply::UnknownWorker);
    }

    /// A reported failure ends the generation at once; the member that died with it (it never
    /// joins again) gets no rank in the next one, and the survivor forms a group of one
    /// (min 1) after settling, at a newer generation; later the dead one's id comes back as a
    /// standby.
    #[test]
    fn reported_failure_reforms_without_the_dead_member() {
        let mut m = Membership::new(MembershipConfig {
            min: 1,
            max: 2,
            settle_ms: 1000,
            timeout_ms: 60_000,
        });
        m.join("a", 1, 0);
        m.join("b", 1, 0);
        assert_eq!(m.generation(), 1);
        // b dies; a's all-reduce fails within its timeout and a reports it.
        m.report_failure("a", 1, "peer closed the connection", 100);
        assert!(!m.is_current(1));
        assert!(matches!(
            m.drain_events().as_slice(),
            [Event::Formed { .. }, Event::Failed { worker, generation: 1, .. }] if worker == "a"
        ));
        // A second report of the same generation (b's peer, say) changes nothing.
        m.report_failure("a", 1, "again", 150);
        assert_eq!(m.generation(), 2);
        assert_eq!(m.join("a", 1, 200), JoinReply::Wait);
        m.tick(1300);
        let a = assigned(m.join("a", 1, 1300));
        assert_eq!((a.rank, a.world, a.generation), (0, 1, 3));
        // b comes back (a new process): a standby until the next re-formation.
        assert_eq!(m.join("b", 2, 1400), JoinReply::Wait);
        assert_eq!(m.world(), 1);
    }

    /// A coordinator restarted from its saved generation forms newer generations only.
    #[test]
    fn resumed_membership_keeps_generations_growing() {
        let mut m = Membership::resume(config(), 41);
        m.join("a", 1, 0);
        m.join("b", 1, 0);
        let a = assigned(m.join("a", 1, 1000));
        assert_eq!(a.generation, 42);
        assert!(!m.is_current(41));
        assert_eq!(
            m.heartbeat("a", 41, 1001),
            HeartbeatReply::Abort { current: 42 }
        );
    }
}
