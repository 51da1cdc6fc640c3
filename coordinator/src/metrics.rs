//! The coordinator's Prometheus metrics, `axial_coordinator_*`, through the `metrics` crate and
//! its Prometheus exporter, as the worker's are: counters are counters (`_total`), gauges are
//! gauges, each with help text and a unit. They are set from the job's [`Status`] at each
//! scrape, so they never disagree with `/api/status`.

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::job::Status;

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

const STATES: [&str; 4] = ["running", "joining", "standby", "failed"];

pub struct CoordinatorMetrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    workers: [Gauge; 4],
    generation: Gauge,
    world_size: Gauge,
    global_step: Gauge,
    samples_per_second: Gauge,
    committed_step: Gauge,
    checkpoint_age: Gauge,
    checkpoint_duration: Gauge,
    job_finished: Gauge,
    straggler_ratio: Gauge,
    max_share: Gauge,
    min_share: Gauge,
    slowest_rank: Gauge,
    slowest_step: Gauge,
    restarts: Counter,
    changes: Counter,
    commit_failures: Counter,
}

impl std::fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoordinatorMetrics")
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    pub fn new() -> Self {
        let recorder = Arc::new(PrometheusBuilder::new().build_recorder());
        let r = recorder.clone();
        let gauge = |name: &'static str, unit: Unit, help: &'static str| {
            r.describe_gauge(name.into(), Some(unit), help.into());
            r.register_gauge(&Key::from_name(name), &META)
        };
        let counter = |name: &'static str, help: &'static str| {
            r.describe_counter(name.into(), Some(Unit::Count), help.into());
            r.register_counter(&Key::from_name(name), &META)
        };
        r.describe_gauge(
            "axial_coordinator_workers".into(),
            Some(Unit::Count),
            "Workers by state: running (a rank), joining, standby, failed (gave up).".into(),
        );
        let workers = STATES.map(|s| {
            r.register_gauge(
                &Key::from_parts("axial_coordinator_workers", vec![Label::new("state", s)]),
                &META,
            )
        });
        Self {
            workers,
            generation: gauge(
                "axial_coordinator_generation",
                Unit::Count,
                "Current generation (changes with every membership change).",
            ),
            world_size: gauge(
                "axial_coordinator_world_size",
                Unit::Count,
                "Ranks in the running group (0 while none runs).",
            ),
            global_step: gauge(
                "axial_coordinator_global_step",
                Unit::Count,
                "Highest optimizer step reported by a rank of the running group.",
            ),
            samples_per_second: gauge(
                "axial_coordinator_samples_per_second",
                Unit::CountPerSecond,
                "Training samples per second (all ranks), as rank 0 reports it.",
            ),
            committed_step: gauge(
                "axial_coordinator_committed_step",
                Unit::Count,
                "Step of the newest committed checkpoint.",
            ),
            checkpoint_age: gauge(
                "axial_coordinator_checkpoint_age_seconds",
                Unit::Seconds,
                "Seconds since the newest checkpoint was committed.",
            ),
            checkpoint_duration: gauge(
                "axial_coordinator_checkpoint_duration_seconds",
                Unit::Seconds,
                "From the first to the last vote of the newest checkpoint.",
            ),
            job_finished: gauge(
                "axial_coordinator_job_finished",
                Unit::Count,
                "1 once the job has finished (the coordinator exits after --linger seconds).",
            ),
            straggler_ratio: gauge(
                "axial_coordinator_straggler_ratio",
                Unit::Count,
                "The median rank's speed over the slowest rank's, in samples per second of \
                 their own work (1: no straggler).",
            ),
            slowest_rank: gauge(
                "axial_coordinator_slowest_rank",
                Unit::Count,
                "The slowest rank by samples per second of its own work (the straggler; -1 \
                 while none reports).",
            ),
            slowest_step: gauge(
                "axial_coordinator_slowest_step_seconds",
                Unit::Seconds,
                "The slowest rank's own work per step (its phases without the waits for the \
                 other ranks).",
            ),
            max_share: gauge(
                "axial_coordinator_batch_share_max_ratio",
                Unit::Count,
                "The largest rank's share of the global batch over the even share (1: the \
                 even split; [train] rebalance splits it by speed).",
            ),
            min_share: gauge(
                "axial_coordinator_batch_share_min_ratio",
                Unit::Count,
                "The smallest rank's share of the global batch over the even share.",
            ),
            restarts: counter(
                "axial_coordinator_restarts_total",
                "Times the coordinator was started again on this job's saved state.",
            ),
            changes: counter(
                "axial_coordinator_hyperparameter_changes_total",
                "Hyperparameter changes accepted during the job.",
            ),
            commit_failures: counter(
                "axial_coordinator_commit_failures_total",
                "Checkpoint commits that failed (the manifest could not be written).",
            ),
            handle: recorder.handle(),
            recorder,
        }
    }

    /// The exposition text for `status`.
    pub fn render(&self, status: &Status) -> String {
        for (gauge, state) in self.workers.iter().zip(STATES) {
            gauge.set(status.workers_by_state.get(state).copied().unwrap_or(0) as f64);
        }
        self.straggler_ratio
            .set(status.straggler_ratio.unwrap_or(1.0));
        let slowest = status.ranks.first();
        self.slowest_rank
            .set(slowest.map_or(-1.0, |r| r.rank as f64));
        self.slowest_step
            .set(slowest.map_or(0.0, |r| r.busy_seconds));
        let (lo, hi) = status.batch_shares.as_ref().map_or((1.0, 1.0), |s| {
            let even = s.samples.iter().sum::<u64>() as f64 / s.samples.len().max(1) as f64;
            let ratio = |v: Option<&u64>| v.map_or(1.0, |v| *v as f64 / even.max(1.0));
            (ratio(s.samples.iter().min()), ratio(s.samples.iter().max()))
        });
        self.min_share.set(lo);
        self.max_share.set(hi);
        self.generation.set(status.generation as f64);
        self.world_size.set(status.world as f64);
        self.global_step.set(status.global_step as f64);
        self.samples_per_second.set(status.images_per_second);
        if let Some(c) = &status.committed {
            self.committed_step.set(c.step as f64);
            if let Some(age) = c.age_ms {
                self.checkpoint_age.set(age as f64 / 1e3);
            }
        }
        if let Some(ms) = status.checkpoint_ms {
            self.checkpoint_duration.set(ms as f64 / 1e3);
        }
        self.job_finished.set(f64::from(u8::from(status.finished)));
        self.restarts.absolute(status.restarts);
        self.changes.absolute(status.changes.len() as u64);
        self.commit_failures.absolute(status.commit_failures);
        let _ = &self.recorder;
        self.handle.run_upkeep();
        self.handle.render()
    }
}
