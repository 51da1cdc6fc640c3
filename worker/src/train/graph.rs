//! CUDA-graph capture of the training step (`[train] cuda_graphs = true`).
//!
//! The many small kernels of the attention layers cost more to launch than to run on a GPU;
//! with static shapes the forward and backward of a micro-batch can be captured once as one
//! CUDA graph and replayed, one launch per micro-batch. [`GraphedStep`] runs the first
//! [`WARMUP_PASSES`] full micro-batches as usual on the graph's side stream (lazy
//! initialisation: cuBLAS workspaces, autograd's device threads), captures the next one, and
//! from then on copies each full micro-batch into the graph's static inputs and replays it.
//! What the graph does not cover runs as before: micro-batches of another shape (the last
//! short step, an empty share) and the whole update (all-reduce, unscaling, clipping, the
//! optimizer), so the gradient buckets, fp16's overflow check and the optimizer behave as
//! without graphs. The loss weight (the micro-batch's share of the step times fp16's loss
//! scale) is a device scalar the graph reads, set before each replay.
//!
//! The graph reads the weights and the running statistics and accumulates into the gradients
//! at the addresses they had when it was captured. Before each replay those addresses are
//! compared with the captured ones; when anything moved (the gradients were re-bucketed as a
//! group formed, a checkpoint replaced a tensor) the step is captured again.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;

use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::shim::{self, ErrorBuf};

/// Full micro-batches run uncaptured (on the side stream) before the capture.
pub const WARMUP_PASSES: usize = 3;

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn axial_cuda_graph_new(device: c_int, err: *mut c_char, len: usize) -> *mut c_void;
        pub fn axial_cuda_graph_begin(
            g: *mut c_void,
            capture: c_int,
            err: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn axial_cuda_graph_end(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn axial_cuda_graph_replay(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
        pub fn axial_cuda_graph_free(g: *mut c_void);
    }
}

/// One CUDA graph of the shim and its side stream.
struct CudaGraph(NonNull<c_void>);

#[allow(unsafe_code)]
impl CudaGraph {
    fn new(device: usize) -> std::result::Result<Self, String> {
        let mut err = ErrorBuf::new();
        let (ptr, len) = err.raw();
        // SAFETY: the shim writes at most len bytes into the error buffer and keeps no pointer.
        let g = unsafe { ffi::axial_cuda_graph_new(device as c_int, ptr, len) };
        NonNull::new(g).map(Self).ok_or_else(|| err.text())
    }

    /// Runs `f` on the side stream, captured into this graph when `capture`. The begin is
    /// always closed, also when `f` fails or panics (then re-raised); when both `f` and the
    /// close fail, `f`'s error is the one returned (an op that fails while capturing makes
    /// the close fail too).
    fn on_side_stream<T>(&self, capture: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let what = if capture {
            "capturing the training step"
        } else {
            "the side stream"
        };
        let g = self.0.as_ptr();
        // SAFETY: a live handle; the shim writes at most len bytes into the error buffer and
        // keeps no pointer.
        shim::call(|err, len| unsafe {
            ffi::axial_cuda_graph_begin(g, capture as c_int, err, len)
        })
        .map_err(|e| graphs_refused(what, e))?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: as above.
        let closed = shim::call(|err, len| unsafe { ffi::axial_cuda_graph_end(g, err, len) });
        match out {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(Err(e)) => Err(e),
            Ok(Ok(v)) => closed.map(|()| v).map_err(|e| graphs_refused(what, e)),
        }
    }

    fn replay(&self) -> std::result::Result<(), String> {
        let g = self.0.as_ptr();
        // SAFETY: a live handle; the error buffer as above.
        shim::call(|err, len| unsafe { ffi::axial_cuda_graph_replay(g, err, len) })
    }
}

#[allow(unsafe_code)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the handle came from axial_cuda_graph_new and is freed once, here.
        unsafe { ffi::axial_cuda_graph_free(self.0.as_ptr()) }
    }
}

/// A captured micro-batch: the tensors the graph reads and writes.
struct Captured {
    images: Tensor,
    labels: Tensor,
    weight: Tensor,
    loss: Tensor,
    addresses: Vec<usize>,
}

enum State {
    /// `passes` full micro-batches have run uncaptured on the graph's side stream.
    WarmingUp {
        passes: usize,
    },
    Captured(Captured),
    /// A warm-up pass or the capture failed (the step returned its error).
    Failed,
}

/// The step's forward and backward as a CUDA graph (see the module documentation).
pub struct GraphedStep {
    device: usize,
    /// The micro-batch size captured; batches of another size run uncaptured.
    batch: i64,
    graph: CudaGraph,
    /// The weights and running statistics (and through them the gradients) the graph uses.
    watched: Vec<Tensor>,
    state: RefCell<State>,
    captures: Cell<u64>,
}

/// What a graphed pass computes: forward, loss and `(loss * weight).backward()` of `images`
/// and `labels` on the device, `weight` a float scalar there; returns the detached loss.
pub type Pass<'p> = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'p;

/// The error of a `cuda_graphs` run that cannot have its graphs: `what` failed, `e` why.
pub(crate) fn graphs_refused(what: &str, e: String) -> Error {
    Error::Config(axial_common::ConfigError::Invalid {
        key: "train.cuda_graphs".into(),
        value: "true".into(),
        allowed: format!("{what}: {e} (set train.cuda_graphs = false to train without graphs)"),
    })
}

impl GraphedStep {
    /// Graphs for a step of full micro-batches of `batch` samples on `device` over the
    /// model's `variables` (weights and buffers). Fails on a device that is not CUDA, or a
    /// build without CUDA.
    pub fn new(device: Device, batch: i64, variables: Vec<Tensor>) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(graphs_refused(
                "CUDA graphs need a CUDA device",
                format!("this worker trains on {device:?}"),
            ));
        };
        let graph =
            CudaGraph::new(index).map_err(|e| graphs_refused("CUDA graphs need a GPU", e))?;
        Ok(Self {
            device: index,
            batch,
            graph,
            watched: variables,
            state: RefCell::new(State::WarmingUp { passes: 0 }),
            captures: Cell::new(0),
        })
    }

    /// How many times the step was captured (1 once warm; more after tensors moved).
    pub fn captures(&self) -> u64 {
        self.captures.get()
    }

    /// Whether the step is captured and `images` `[n, 3, S, S]` would replay it.
    pub fn replays(&self, images: &Tensor) -> bool {
        match &*self.state.borrow() {
            State::Captured(c) => c.images.size() == images.size(),
            State::WarmingUp { .. } | State::Failed => false,
        }
    }

    /// Runs one full micro-batch through `pass`: uncaptured while warming up, then captured,
    /// then replayed. `weight` is the loss weight. Returns the detached loss, or `None` for a
    /// batch that is not full or not of the captured shape (the caller runs it as usual).
    pub fn run(
        &self,
        images: &Tensor,
        labels: &Tensor,
        weight: f64,
        pass: &Pass<'_>,
    ) -> Result<Option<Tensor>> {
        if images.size().first() != Some(&self.batch) {
            return Ok(None);
        }
        let mut state = self.state.borrow_mut();
        if let State::Captured(c) = &*state {
            if c.images.size() != images.size() || c.labels.size() != labels.size() {
                return Ok(None);
            }
            if c.addresses == self.addresses() {
                c.images.shallow_clone().copy_(images);
                c.labels.shallow_clone().copy_(labels);
                let _ = c.weight.shallow_clone().fill_(weight);
                self.graph
                    .replay()
                    .map_err(|e| graphs_refused("replay", e))?;
                return Ok(Some(c.loss.copy()));
            }
            // Something the graph reads or writes moved: capture again (warm already).
            *state = State::WarmingUp {
                passes: WARMUP_PASSES,
            };
        }
        // Out of the cell while it runs: a failed pass or capture leaves `Failed` behind.
        let State::WarmingUp { passes } = std::mem::replace(&mut *state, State::Failed) else {
            return Err(graphs_refused(
                "capturing the training step",
                "an earlier capture failed".into(),
            ));
        };
        let dev = Device::Cuda(self.device);
        // Copies: a batch already on the device must not become the graph's static input.
        let images = images.to_device(dev).copy();
        let labels = labels.to_device(dev).copy();
        let weight_t = Tensor::from(weight as f32).to_device(dev);
        let capture = passes >= WARMUP_PASSES;
        let loss = self
            .graph
            .on_side_stream(capture, || pass(&images, &labels, &weight_t))?;
        if !capture {
            *state = State::WarmingUp { passes: passes + 1 };
            return Ok(Some(loss));
        }
        // The capture recorded the work without running it: this batch runs as the replay.
        self.graph
            .replay()
            .map_err(|e| graphs_refused("replay", e))?;
        self.captures.set(self.captures.get() + 1);
        let out = loss.copy();
        *state = State::Captured(Captured {
            images,
            labels,
            weight: weight_t,
            loss,
            addresses: self.addresses(),
        });
        Ok(Some(out))
    }

    /// Where the watched tensors and their gradients live now.
    fn addresses(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.watched.len() * 2);
        for t in &self.watched {
            out.push(t.data_ptr() as usize);
            if t.requires_grad() {
                let g = t.grad();
                out.push(if g.defined() {
                    g.data_ptr() as usize
                } else {
                    0
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a CUDA device a graphed step is refused with an error that names the setting
    /// and the device (the run stops before training instead of silently running uncaptured).
    #[test]
    fn graphs_on_the_cpu_are_refused_naming_the_setting() {
        let e = GraphedStep::new(Device::Cpu, 8, Vec::new())
            .err()
            .expect("refused on the CPU")
            .to_string();
        assert!(e.contains("train.cuda_graphs"), "{e}");
        assert!(e.contains("Cpu"), "{e}");
        if !tch::Cuda::is_available() {
            let e = GraphedStep::new(Device::Cuda(0), 8, Vec::new())
                .err()
                .expect("refused without a GPU")
                .to_string();
            println!("no GPU: {e}");
            assert!(
                e.contains("train.cuda_graphs") && e.contains("cuda:0"),
                "{e}"
            );
        }
    }
}
