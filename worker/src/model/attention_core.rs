//! The fused core of an axial-attention layer on the CPU (csrc/attention.cpp): from the
//! normalized `qkv` and the gathered relative embeddings to the layer's two outputs per
//! channel (`Σ a v`, `Σ a r^v`), through the three similarity terms, `bn_similarity`, the
//! window mask and the softmax, as one autograd function with a hand-written backward.
//!
//! The same computation as the separate operations of [`super::attention`]'s reference path
//! (einsums, `cat`, batch norm, sum, softmax), which stay for CUDA, other dtypes, synchronized
//! batch norm and attention maps; tests hold the two paths to each other, forward and
//! backward, and the model to the reference fixtures.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};

use super::batch_norm::{BatchNorm, EPS, MOMENTUM};

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int, c_void};
    unsafe extern "C" {
        /// csrc/attention.cpp: `*out` receives a new `[B, G, gp, 2, L]` tensor.
        pub fn axial_attention_core(
            qkv: *mut c_void,
            emb: *mut c_void,
            gamma: *mut c_void,
            beta: *mut c_void,
            running_mean: *mut c_void,
            running_var: *mut c_void,
            mask: *mut c_void,
            heads: i64,
            qoff: i64,
            koff: i64,
            train: c_int,
            momentum: f64,
            eps: f64,
            group: *mut c_void,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Turns the fused core on or off for the whole process (on by default; the bench's
/// `--fused-attention false` measures the separate operations).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// How many layer passes the fused core has run in this process (tests check that a
/// configuration takes it, rather than falling back to the separate operations).
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Whether the fused core runs for a layer whose `qkv` this is (with synchronized statistics
/// too: the core sums them over the group itself).
pub(crate) fn applies(qkv: &Tensor, want_maps: bool) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && !want_maps
        && qkv.device() == Device::Cpu
        && qkv.kind() == Kind::Float
}

/// `qkv`: `[B, G, 2gp, L]` after `bn_qkv` (q at channel `qoff` of each head, k at `koff`, v at
/// gp); `emb`: `[2gp, L, L]`; `outside`: `[L, L]` bool, true outside the window. Returns
/// `[B, G, gp, 2, L]`. In training, `bn_similarity`'s running statistics are updated; when the
/// norm is synchronized, its statistics are those of every rank's batch (one all-reduce of the
/// per-channel sums in the forward, one of the two gradient sums in the backward, both in
/// float64, as [`BatchNorm`]'s synchronized path computes them).
#[allow(unsafe_code)]
pub(crate) fn forward(
    qkv: &Tensor,
    emb: &Tensor,
    bn_similarity: &BatchNorm,
    outside: Option<&Tensor>,
    qoff: i64,
    koff: i64,
    train: bool,
) -> Result<Tensor, String> {
    let heads = qkv.size()[1];
    let sync = if train {
        bn_similarity.sync_context()
    } else {
        None
    };
    let group = sync
        .as_ref()
        .map_or(std::ptr::null_mut(), |ctx| ctx.group.ptr);
    let qkv = qkv.contiguous();
    let emb = emb.contiguous();
    let mut out: *mut c_void = std::ptr::null_mut();
    let ptr = |t: &Tensor| t.as_ptr() as *mut c_void;
    crate::shim::call(|err, len| {
        // SAFETY: every pointer is a live at::Tensor* for the call, `group` a live group (held
        // by the norm's sync context, which outlives the step's backward) or null; the shim
        // checks shapes, dtypes and devices before reading, and on success *out is a new heap
        // at::Tensor.
        unsafe {
            ffi::axial_attention_core(
                ptr(&qkv),
                ptr(&emb),
                ptr(&bn_similarity.weight),
                ptr(&bn_similarity.bias),
                ptr(&bn_similarity.running_mean),
                ptr(&bn_similarity.running_var),
                outside.map_or(std::ptr::null_mut(), ptr),
                heads,
                qoff,
                koff,
                c_int::from(train),
                MOMENTUM,
                EPS,
                group,
                &mut out,
                err,
                len,
            )
        }
    })
    .inspect_err(|message| {
        // A failed all-reduce (a peer gone): the step reports it at its end, as the
        // synchronized norms of the separate operations do.
        if let Some(ctx) = &sync
            && message.contains(crate::collective::FAILURE_MARK)
        {
            ctx.record(crate::collective::CollectiveError {
                op: "synchronized attention norm (fused core)",
                rank: ctx.group.rank(),
                world: ctx.group.world(),
                message: message.clone(),
            });
        }
    })?;
    if train {
        bn_similarity.count_batch();
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `out` is a fresh at::Tensor* whose ownership passes to the Tensor.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}
