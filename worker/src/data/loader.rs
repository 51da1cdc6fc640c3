//! Batches made on loader threads, delivered in a fixed order through a bounded queue.
//!
//! Batch `b` of an epoch is made by thread `b mod T` and queued on that thread's channel (the
//! bound: `prefetch` batches in all); the consumer takes batches round-robin, so the order of
//! batches never depends on which thread is faster. Every augmentation draw of a sample comes
//! from `Rng::derive(seed, [epoch, sample])`, so a batch's pixels never depend on threads either.
//!
//! A sample that cannot be read or decoded is left out of its batch and reported in
//! [`Batch::errors`]: the run goes on, and the caller counts and logs it. A loader thread that
//! dies (a panic in decoding, say) is an error ([`LoaderError`]), never the end of the epoch:
//! the samples it would have made were not trained on, and the ledger must not say they were.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use axial_common::Rng;
use tch::{Kind, Tensor};

use super::augment::Transform;
use super::{SampleError, Source};

/// What to load: samples, cut into batches.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Sample indices in the order they are consumed.
    pub order: Vec<usize>,
    /// Each batch as a range of `order` (possibly of different sizes, or empty).
    pub batches: Vec<std::ops::Range<usize>>,
    /// Random augmentation (training) or the deterministic evaluation transform.
    pub train: bool,
    pub epoch: u64,
    pub seed: u64,
}

impl Plan {
    /// `order` cut into consecutive batches of `batch_size` (the last may be smaller).
    pub fn chunked(
        order: Vec<usize>,
        batch_size: usize,
        train: bool,
        epoch: u64,
        seed: u64,
    ) -> Self {
        let n = order.len();
        let b = batch_size.max(1);
        let batches = (0..n.div_ceil(b))
            .map(|i| i * b..((i + 1) * b).min(n))
            .collect();
        Self {
            order,
            batches,
            train,
            epoch,
            seed,
        }
    }

    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }
}

/// A batch on the CPU: `images` `[n, 3, S, S]` float, `labels` `[n]` int64, n <= batch size.
#[derive(Debug)]
pub struct Batch {
    /// Position of the batch in the epoch.
    pub index: usize,
    pub images: Tensor,
    pub labels: Tensor,
    /// Sample indices in the batch (skipped ones excluded).
    pub samples: Vec<usize>,
    /// Samples of this batch that could not be read or decoded.
    pub errors: Vec<SampleError>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A loader thread died before making every batch it owed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("loader thread {thread} died before batch {batch} of {total}: {reason}")]
pub struct LoaderError {
    pub thread: usize,
    pub batch: usize,
    pub total: usize,
    pub reason: String,
}

pub struct Loader {
    receivers: Vec<Receiver<Batch>>,
    next: usize,
    end: usize,
    start: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("next", &self.next)
            .field("end", &self.end)
            .finish()
    }
}

fn make_batch(source: &dyn Source, transform: &Transform, plan: &Plan, b: usize) -> Batch {
    let range = plan.batches[b].clone();
    let (lo, hi) = (range.start, range.end);
    let per = transform.len();
    let mut pixels = vec![0f32; (hi - lo) * per];
    let mut labels = Vec::with_capacity(hi - lo);
    let mut samples = Vec::with_capacity(hi - lo);
    let mut errors = Vec::new();
    for &index in &plan.order[lo..hi] {
        match source.get(index) {
            Ok(sample) => {
                let out = &mut pixels[samples.len() * per..(samples.len() + 1) * per];
                if plan.train {
                    let mut rng = Rng::derive(plan.seed, &[plan.epoch, index as u64]);
                    transform.train(&sample.image, &mut rng, out);
                } else {
                    transform.eval(&sample.image, out);
                }
                labels.push(sample.label);
                samples.push(index);
            }
            Err(e) => errors.push(e),
        }
    }
    pixels.truncate(samples.len() * per);
    let s = transform.size as i64;
    Batch {
        index: b,
        images: Tensor::from_slice(&pixels).view([samples.len() as i64, 3, s, s]),
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
        samples,
        errors,
    }
}

impl Loader {
    /// Starts `threads` loader threads with room for `prefetch` finished batches.
    pub fn start(
        source: Arc<dyn Source>,
        transform: Transform,
        plan: Plan,
        threads: usize,
        prefetch: usize,
    ) -> Self {
        let threads = threads.max(1);
        let per_thread = prefetch.div_ceil(threads).max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let plan = Arc::new(plan);
        let transform = Arc::new(transform);
        let end = plan.num_batches();
        let start = 0;
        let mut receivers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let (tx, rx): (SyncSender<Batch>, Receiver<Batch>) = sync_channel(per_thread);
            receivers.push(rx);
            let (source, transform, plan, stop) = (
                source.clone(),
                transform.clone(),
                plan.clone(),
                stop.clone(),
            );
            handles.push(Some(std::thread::spawn(move || {
                let mut b = start + t;
                while b < end && !stop.load(Ordering::Relaxed) {
                    let batch = make_batch(source.as_ref(), &transform, &plan, b);
                    if tx.send(batch).is_err() {
                        break;
                    }
                    b += threads;
                }
            })));
        }
        Self {
            receivers,
            next: start,
            end,
            start,
            stop,
            handles,
        }
    }

    /// Batches still to come.
    pub fn remaining(&self) -> usize {
        self.end - self.next
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let t = (self.next - self.start) % self.receivers.len();
        match self.receivers[t].recv() {
            Ok(batch) => {
                self.next += 1;
                Some(Ok(batch))
            }
            // The thread is gone with batches still owed: say why, and end the iteration.
            Err(_) => {
                let reason = match self.handles[t].take().map(JoinHandle::join) {
                    Some(Err(panic)) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .map_or_else(|| "it panicked".to_owned(), |m| format!("it panicked: {m}")),
                    _ => "it stopped".to_owned(),
                };
                let err = LoaderError {
                    thread: t,
                    batch: self.next,
                    total: self.end,
                    reason,
                };
                self.next = self.end;
                Some(Err(err))
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receivers.clear(); // unblocks senders
        for h in self.handles.drain(..).flatten() {
            let _ = h.join();
        }
    }
}
