//! The worker's Prometheus metrics, `axial_worker_*`, served at `/metrics`.
//!
//! [`WorkerMetrics`] holds handles registered on its own recorder (no global recorder): the
//! training loop updates them, and [`serve`] renders them over HTTP on a small thread.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Step phases timed by `axial_worker_step_phase_seconds{phase=...}`, in the order of
/// [`axial_common::STEP_PHASES`].
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    DataWait,
    /// The forward pass, without `SyncWait` (with CUDA graphs, a replay: forward and backward).
    Forward,
    /// The backward pass, without `SyncWait`.
    Backward,
    /// Waiting for the gradient all-reduce after backward (what overlap did not hide).
    AllReduceWait,
    Optimizer,
    /// Blocked in the synchronized batch norms' all-reduces during forward and backward.
    SyncWait,
}

const PHASES: usize = axial_common::STEP_PHASES.len();

pub struct WorkerMetrics {
    recorder: Arc<PrometheusRecorder>,
    pub steps: Counter,
    pub samples: Counter,
    pub skipped_samples: Counter,
    /// Generations this worker abandoned and joined again after.
    pub regroups: Counter,
    pub loss: Gauge,
    pub learning_rate: Gauge,
    pub images_per_second: Gauge,
    pub epoch: Gauge,
    pub eval_top1: Gauge,
    pub eval_top5: Gauge,
    pub eval_loss: Gauge,
    pub checkpoint_seconds: Histogram,
    /// This worker's place in the current group (re-set at each generation).
    pub rank: Gauge,
    pub world_size: Gauge,
    pub generation: Gauge,
    /// CUDA caching allocator: bytes allocated, reserved, and the peak allocated (0 on CPU).
    gpu_allocated: Gauge,
    gpu_reserved: Gauge,
    gpu_peak: Gauge,
    phases: [Histogram; PHASES],
    /// Seconds spent in each phase since the last [`WorkerMetrics::take_phase_sums`] (f64
    /// bits), for the heartbeat's per-phase breakdown.
    phase_sums: [std::sync::atomic::AtomicU64; PHASES],
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

const META: Metadata<'static> = Metadata::new("axial_worker", metrics::Level::INFO, None);

impl WorkerMetrics {
    /// Metrics of the worker `worker_id`: every series carries `worker="<id>"`, and the
    /// rank, world size and generation are gauges (a rank changes as groups re-form; a label
    /// would split one worker's series at each re-formation).
    pub fn new(worker_id: &str) -> Self {
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .add_global_label("worker", worker_id);
        let r = Arc::new(builder.build_recorder());
        let counter = |name: &'static str, unit, help: &'static str| {
            r.describe_counter(name.into(), Some(unit), help.into());
            r.register_counter(&Key::from_name(name), &META)
        };
        let gauge = |name: &'static str, unit, help: &'static str| {
            r.describe_gauge(name.into(), Some(unit), help.into());
            r.register_gauge(&Key::from_name(name), &META)
        };
        r.describe_histogram(
            "axial_worker_step_phase_seconds".into(),
            Some(Unit::Seconds),
            "Time of each phase of a training step: data_wait, forward, backward, \
             allreduce_wait (the gradient all-reduce after backward), optimizer, sync_wait \
             (the synchronized batch norms' all-reduces in forward and backward)."
                .into(),
        );
        let phase = |p: &'static str| {
            r.register_histogram(
                &Key::from_parts(
                    "axial_worker_step_phase_seconds",
                    vec![Label::new("phase", p)],
                ),
                &META,
            )
        };
        r.describe_histogram(
            "axial_worker_checkpoint_seconds".into(),
            Some(Unit::Seconds),
            "Time to write one checkpoint.".into(),
        );
        Self {
            steps: counter(
                "axial_worker_steps_total",
                Unit::Count,
                "Optimizer steps taken.",
            ),
            samples: counter(
                "axial_worker_samples_total",
                Unit::Count,
                "Training samples consumed.",
            ),
            skipped_samples: counter(
                "axial_worker_skipped_samples_total",
                Unit::Count,
                "Samples skipped because they could not be read or decoded.",
            ),
            regroups: counter(
                "axial_worker_regroups_total",
                Unit::Count,
                "Times the group re-formed under this worker (a peer or the coordinator lost).",
            ),
            loss: gauge(
                "axial_worker_loss",
                Unit::Count,
                "Training loss at the last logged step.",
            ),
            learning_rate: gauge(
                "axial_worker_learning_rate",
                Unit::Count,
                "Learning rate of the last step.",
            ),
            images_per_second: gauge(
                "axial_worker_images_per_second",
                Unit::CountPerSecond,
                "Training throughput over the last logging interval.",
            ),
            epoch: gauge(
                "axial_worker_epoch",
                Unit::Count,
                "Epoch in progress (0-based).",
            ),
            eval_top1: gauge(
                "axial_worker_eval_top1",
                Unit::Count,
                "Validation top-1 accuracy (0..1) of the last evaluation.",
            ),
            eval_top5: gauge(
                "axial_worker_eval_top5",
                Unit::Count,
                "Validation top-5 accuracy (0..1) of the last evaluation.",
            ),
            eval_loss: gauge(
                "axial_worker_eval_loss",
                Unit::Count,
                "Validation loss of the last evaluation.",
            ),
            checkpoint_seconds: r
                .register_histogram(&Key::from_name("axial_worker_checkpoint_seconds"), &META),
            rank: gauge(
                "axial_worker_rank",
                Unit::Count,
                "This worker's rank in the current group (-1 while it has none).",
            ),
            world_size: gauge(
                "axial_worker_world_size",
                Unit::Count,
                "Ranks in this worker's current group.",
            ),
            generation: gauge(
                "axial_worker_generation",
                Unit::Count,
                "Generation (group formation) this worker trains in.",
            ),
            gpu_allocated: gauge(
                "axial_worker_gpu_memory_allocated_bytes",
                Unit::Bytes,
                "CUDA memory held by tensors (torch.cuda.memory_allocated).",
            ),
            gpu_reserved: gauge(
                "axial_worker_gpu_memory_reserved_bytes",
                Unit::Bytes,
                "CUDA memory held by the caching allocator (torch.cuda.memory_reserved).",
            ),
            gpu_peak: gauge(
                "axial_worker_gpu_memory_peak_allocated_bytes",
                Unit::Bytes,
                "Peak CUDA memory held by tensors since the worker started.",
            ),
            phases: axial_common::STEP_PHASES.map(phase),
            recorder: r,
            phase_sums: Default::default(),
        }
    }

    /// Samples the CUDA allocator's memory of `device` into the gauges (nothing on the CPU).
    pub fn sample_device_memory(&self, device: tch::Device) {
        let tch::Device::Cuda(index) = device else {
            return;
        };
        match cuda_memory(index) {
            Ok(m) => {
                self.gpu_allocated.set(m.allocated as f64);
                self.gpu_reserved.set(m.reserved as f64);
                self.gpu_peak.set(m.peak_allocated as f64);
            }
            // Not worth failing a step over; the gauges keep their last values.
            Err(e) => eprintln!("WARNING: CUDA memory of cuda:{index}: {e}"),
        }
    }

    pub fn phase(&self, phase: Phase) -> &Histogram {
        &self.phases[phase as usize]
    }

    /// Records `seconds` of `phase`: the histogram, and the sum the next heartbeat reports.
    pub fn record(&self, phase: Phase, seconds: f64) {
        use std::sync::atomic::Ordering;
        self.phases[phase as usize].record(seconds);
        let sum = &self.phase_sums[phase as usize];
        let mut old = sum.load(Ordering::Relaxed);
        loop {
            let new = (f64::from_bits(old) + seconds).to_bits();
            match sum.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => old = now,
            }
        }
    }

    /// Seconds spent in each phase ([`axial_common::STEP_PHASES`]) since the last call.
    pub fn take_phase_sums(&self) -> [f64; PHASES] {
        self.phase_sums
            .each_ref()
            .map(|s| f64::from_bits(s.swap(0, std::sync::atomic::Ordering::Relaxed)))
    }

    pub fn handle(&self) -> PrometheusHandle {
        self.recorder.handle()
    }

    /// The exposition text, as `/metrics` serves it.
    pub fn render(&self) -> String {
        let h = self.handle();
        h.run_upkeep();
        h.render()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new("local")
    }
}

/// Bytes the CUDA caching allocator holds on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: i64,
    pub reserved: i64,
    pub peak_allocated: i64,
}

#[allow(unsafe_code)]
mod ffi {
    use std::ffi::{c_char, c_int};
    unsafe extern "C" {
        pub fn axial_cuda_memory(
            device: c_int,
            allocated: *mut i64,
            reserved: *mut i64,
            peak_allocated: *mut i64,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

/// The CUDA caching allocator's memory on `cuda:<device>` (an error without CUDA).
#[allow(unsafe_code)]
pub fn cuda_memory(device: usize) -> Result<CudaMemory, String> {
    let mut m = CudaMemory {
        allocated: 0,
        reserved: 0,
        peak_allocated: 0,
    };
    let device = std::ffi::c_int::try_from(device).map_err(|_| "device index too large")?;
    // SAFETY: the shim writes the three integers and at most len bytes into the error buffer,
    // and keeps no pointer.
    crate::shim::call(|err, len| unsafe {
        ffi::axial_cuda_memory(
            device,
            &mut m.allocated,
            &mut m.reserved,
            &mut m.peak_allocated,
            err,
            len,
        )
    })?;
    Ok(m)
}

/// Serves `/metrics` on `addr` from a thread of its own (hyper's HTTP/1 server on a small
/// runtime): a request must send its headers within 5 s and within 16 KiB, a connection lasts
/// at most 30 s, and any other path is a 404. Returns the bound address.
pub fn serve(addr: SocketAddr, handle: PrometheusHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let handle = handle.clone();
                            async move { Ok::<_, std::convert::Infallible>(respond(&req, &handle)) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(5))
                            .max_buf_size(16 * 1024)
                            .keep_alive(false)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                        let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                    });
                }
            });
        })?;
    Ok(bound)
}

fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, body) = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        handle.run_upkeep();
        (hyper::StatusCode::OK, handle.render())
    } else {
        (
            hyper::StatusCode::NOT_FOUND,
            "not found: try GET /metrics\n".to_owned(),
        )
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_help_and_phases() {
        let m = WorkerMetrics::new("w7");
        m.steps.increment(3);
        m.rank.set(1.0);
        m.samples.increment(96);
        m.skipped_samples.increment(1);
        m.loss.set(1.5);
        m.record(Phase::Forward, 0.02);
        m.record(Phase::DataWait, 0.001);
        m.eval_top1.set(0.9);
        // On the CPU there is no CUDA memory to sample: the gauges stay 0.
        m.sample_device_memory(tch::Device::Cpu);
        let text = m.render();
        for needle in [
            "# HELP axial_worker_steps_total",
            "axial_worker_steps_total{worker=\"w7\"} 3",
            "axial_worker_samples_total{worker=\"w7\"} 96",
            "axial_worker_skipped_samples_total{worker=\"w7\"} 1",
            "axial_worker_loss{worker=\"w7\"} 1.5",
            "axial_worker_rank{worker=\"w7\"} 1",
            "axial_worker_eval_top1{worker=\"w7\"} 0.9",
            "axial_worker_gpu_memory_allocated_bytes{worker=\"w7\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let series = |name: &str, labels: &[&str], value: &str| {
            text.lines().any(|l| {
                l.starts_with(name)
                    && labels.iter().all(|x| l.contains(x))
                    && l.ends_with(&format!(" {value}"))
            })
        };
        let forward = ["phase=\"forward\"", "worker=\"w7\"", "le=\"0.025\""];
        assert!(
            series("axial_worker_step_phase_seconds_bucket{", &forward, "1"),
            "{text}"
        );
        let data = ["phase=\"data_wait\"", "worker=\"w7\""];
        assert!(
            series("axial_worker_step_phase_seconds_count{", &data, "1"),
            "{text}"
        );
    }

    #[test]
    fn serves_metrics_over_http() {
        use std::io::Write;
        let m = WorkerMetrics::new("w0");
        m.steps.increment(7);
        let addr = serve("127.0.0.1:0".parse().expect("addr"), m.handle()).expect("bind");
        let get = |path: &str| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).expect("read");
            out
        };
        let ok = get("/metrics");
        assert!(
            ok.starts_with("HTTP/1.1 200")
                && ok.contains("axial_worker_steps_total{worker=\"w0\"} 7"),
            "{ok}"
        );
        assert!(get("/other").starts_with("HTTP/1.1 404"));
        // An oversized request is refused, not buffered without end.
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = s.write_all(huge.as_bytes());
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
    }
}
