//! Collectives on libtorch's own c10d process groups, through the C++ shim in `csrc/`:
//! ProcessGroupNCCL for CUDA tensors and ProcessGroupGloo for CPU tensors, chosen at run time
//! from the device ([`ProcessGroup::for_device`]); both are compiled into every build made
//! against the CUDA libtorch. CPU tests run the very code path PyTorch DDP runs. Every call has a timeout: a collective whose
//! peer died fails with an error instead of hanging.
//!
//! - [`Store`] and [`ProcessGroup`]: rendezvous through a key-value store, all-reduce (sum,
//!   coalesced over a list), broadcast, barrier. A worker's store is the coordinator's
//!   ([`Store::key_value`] over [`KeyValue`], see `crate::join`); tests and benchmarks may use a
//!   c10d TCPStore hosted by rank 0 ([`Store::new`]).
//! - [`ddp`]: data-parallel semantics on top: rank 0's weights and buffers broadcast to all,
//!   gradients all-reduced in ~25 MB buckets in reverse parameter order, running statistics
//!   averaged.
//!
//! The group's bootstrap goes through the coordinator (`crate::join`): the store is the
//! coordinator's rendezvous store of the generation, reached with the job token; no worker
//! listens for it. Each rank's Gloo device is bound to its own address ([`Local`]).

pub mod ddp;
pub mod reducer;

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Duration;

use tch::Tensor;

use crate::shim::ErrorBuf;

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn axial_store_new(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            bound_port: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        pub fn axial_store_free(store: *mut c_void);
        pub fn axial_kv_store_new(
            ctx: *mut c_void,
            op: super::KvOpFn,
            release: super::KvFreeFn,
            timeout_ms: i64,
        ) -> *mut c_void;
        pub fn axial_gloo_new(
            store: *mut c_void,
            host: *const c_char,
            iface: *const c_char,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        pub fn axial_nccl_compiled() -> c_int;
        pub fn axial_nccl_new(
            store: *mut c_void,
            rank: c_int,
            world: c_int,
            device: c_int,
            timeout_ms: i64,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        pub fn axial_allreduce_sum(
            g: *mut c_void,
            tensors: *const *mut c_void,
            n: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn axial_broadcast(
            g: *mut c_void,
            tensor: *mut c_void,
            root: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn axial_allreduce_sum_autograd(
            g: *mut c_void,
            x: *mut c_void,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn axial_barrier(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
        pub fn axial_group_sync_wait_seconds(g: *mut c_void) -> f64;
        pub fn axial_group_sync_calls(g: *mut c_void) -> u64;
        pub fn axial_group_shared_memory(g: *mut c_void) -> c_int;
        pub fn axial_group_abort(g: *mut c_void);
        pub fn axial_group_free(g: *mut c_void);
        pub fn axial_groups_closing() -> c_int;
    }
}

/// The text the shim puts in front of a collective's error. Inside autograd (the synchronized
/// batch norm's backward) a failed collective surfaces as a plain torch error; this mark says
/// what it was.
pub const FAILURE_MARK: &str = "axial collective failed";

/// Whether a torch error is a failed collective (a peer gone, a timeout).
pub fn is_collective_failure(e: &tch::TchError) -> bool {
    e.to_string().contains(FAILURE_MARK)
}

/// A failed collective: what the backend said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("collective {op} failed (rank {rank} of {world}): {message}")]
pub struct CollectiveError {
    pub op: &'static str,
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

/// A rendezvous store (a c10d Store) that process groups bootstrap through. Created before the
/// group; the group keeps its own reference.
pub struct Store {
    ptr: *mut c_void,
    rank: usize,
    world: usize,
    port: u16,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rank", &self.rank)
            .field("port", &self.port)
            .finish()
    }
}

/// One operation on a [`KeyValue`] store, with c10d's Store semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// The value, waiting for the key to be set.
    Get {
        key: String,
    },
    Add {
        key: String,
        amount: i64,
    },
    Check {
        keys: Vec<String>,
    },
    /// Wait until every key is set.
    Wait {
        keys: Vec<String>,
    },
    Delete {
        key: String,
    },
    CompareSet {
        key: String,
        expected: Vec<u8>,
        value: Vec<u8>,
    },
    NumKeys,
}

/// What a [`KvOp`] gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvReply {
    Done,
    Value(Vec<u8>),
    Number(i64),
    /// GET or WAIT: the keys were not set within the timeout.
    TimedOut,
}

/// A key-value store made in Rust (the coordinator's rendezvous store), for [`Store::key_value`].
/// Called from whichever thread the process group uses, possibly several at once.
pub trait KeyValue: Send + Sync {
    /// Applies `op`; GET and WAIT wait up to `timeout`.
    fn apply(&self, op: KvOp, timeout: Duration) -> Result<KvReply, String>;
}

type KvSinkFn = unsafe extern "C" fn(*mut c_void, *const u8, usize);
type KvOpFn = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *const *const c_char,
    *const usize,
    usize,
    *const u8,
    usize,
    *const u8,
    usize,
    i64,
    i64,
    *mut c_void,
    KvSinkFn,
    *mut i64,
    *mut c_char,
    usize,
) -> c_int;
type KvFreeFn = unsafe extern "C" fn(*mut c_void);

/// The shim's callback for one store operation (codes of `axial.v1.StoreRequest.Op`).
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe extern "C" fn kv_op(
    ctx: *mut c_void,
    op: c_int,
    keys: *const *const c_char,
    key_lens: *const usize,
    nkeys: usize,
    value: *const u8,
    value_len: usize,
    expected: *const u8,
    expected_len: usize,
    amount: i64,
    timeout_ms: i64,
    sink: *mut c_void,
    sink_fn: KvSinkFn,
    number: *mut i64,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    let fail = |message: &str, code: c_int| {
        let bytes = message.as_bytes();
        let n = bytes.len().min(err_len.saturating_sub(1));
        // SAFETY: err has err_len bytes; we write n < err_len bytes and a NUL.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), err, n);
            *err.add(n) = 0;
        }
        code
    };
    // SAFETY: the shim passes `nkeys` (pointer, length) pairs and byte buffers that live for the
    // call, and the context made by Store::key_value.
    let (kv, keys, value, expected) = unsafe {
        let kv = &*(ctx as *const Box<dyn KeyValue>);
        let bytes = |p: *const u8, n: usize| {
            if n == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(p, n).to_vec()
            }
        };
        let mut list = Vec::with_capacity(nkeys);
        for i in 0..nkeys {
            let k = bytes((*keys.add(i)).cast::<u8>(), *key_lens.add(i));
            match String::from_utf8(k) {
                Ok(k) => list.push(k),
                Err(_) => return fail("a store key is not UTF-8", 1),
            }
        }
        (
            kv,
            list,
            bytes(value, value_len),
            bytes(expected, expected_len),
        )
    };
    let named = keys.join(", ");
    let first = || keys.first().cloned().unwrap_or_default();
    let op = match op {
        0 => KvOp::Set {
            key: first(),
            value,
        },
        1 => KvOp::Get { key: first() },
        2 => KvOp::Add {
            key: first(),
            amount,
        },
        3 => KvOp::Check { keys },
        4 => KvOp::Wait { keys },
        5 => KvOp::Delete { key: first() },
        6 => KvOp::CompareSet {
            key: first(),
            expected,
            value,
        },
        7 => KvOp::NumKeys,
        other => return fail(&format!("unknown store operation {other}"), 1),
    };
    let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
    // A panic must not unwind into C++.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kv.apply(op, timeout))) {
        Ok(Ok(KvReply::Done)) => 0,
        Ok(Ok(KvReply::Value(v))) => {
            // SAFETY: the shim's sink copies the bytes during the call.
            unsafe { sink_fn(sink, v.as_ptr(), v.len()) };
            0
        }
        Ok(Ok(KvReply::Number(n))) => {
            // SAFETY: a valid out-pointer for the call.
            unsafe { *number = n };
            0
        }
        Ok(Ok(KvReply::TimedOut)) => fail(
            &format!("keys [{named}] not set within {} ms", timeout.as_millis()),
            2,
        ),
        Ok(Err(message)) => fail(&message, 1),
        Err(_) => fail("the store operation panicked", 1),
    }
}

#[allow(unsafe_code)]
unsafe extern "C" fn kv_free(ctx: *mut c_void) {
    // SAFETY: made by Box::into_raw in Store::key_value, released once by the shim.
    drop(unsafe { Box::from_raw(ctx as *mut Box<dyn KeyValue>) });
}

impl Store {
    /// A c10d TCPStore: rank 0 listens on `host:port` (`port` 0 picks a free one: see
    /// [`Self::port`]); the others connect to it. Every later call fails after `timeout`
    /// instead of waiting forever. For tests and benchmarks: it has no authentication.
    #[allow(unsafe_code)]
    pub fn new(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let host = CString::new(host).map_err(|_| CollectiveError {
            op: "store",
            rank,
            world,
            message: "host contains a NUL byte".into(),
        })?;
        let mut bound: c_int = 0;
        let ptr = create("store", rank, world, |err, len| {
            // SAFETY: valid C string, out-pointers live for the call.
            unsafe {
                ffi::axial_store_new(
                    host.as_ptr(),
                    port as c_int,
                    rank as c_int,
                    world as c_int,
                    timeout.as_millis() as i64,
                    &mut bound,
                    err,
                    len,
                )
            }
        })?;
        Ok(Self {
            ptr,
            rank,
            world,
            port: bound as u16,
            timeout,
        })
    }

    /// A store whose operations `kv` makes (the coordinator's rendezvous store): nothing
    /// listens on this machine. `timeout` bounds every wait for keys.
    #[allow(unsafe_code)]
    pub fn key_value(kv: Box<dyn KeyValue>, rank: usize, world: usize, timeout: Duration) -> Self {
        let ctx = Box::into_raw(Box::new(kv)) as *mut c_void;
        // SAFETY: the shim owns ctx from here and releases it with kv_free.
        let ptr =
            unsafe { ffi::axial_kv_store_new(ctx, kv_op, kv_free, timeout.as_millis() as i64) };
        Self {
            ptr,
            rank,
            world,
            port: 0,
            timeout,
        }
    }

    /// The port a TCPStore listens on (rank 0) or connected to; 0 for a key-value store.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Store {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: created by axial_store_new or axial_kv_store_new, released once; the group
        // holds its own reference.
        unsafe { ffi::axial_store_free(self.ptr) }
    }
}

/// Where this rank's Gloo device listens for its peers (never the store's address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// The address a host name or IP resolves to on this machine.
    Host(String),
    /// A network interface (its first address), as GLOO_SOCKET_IFNAME selects.
    Interface(String),
}

/// Which c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors, one GPU per rank.
    Nccl,
}

impl Backend {
    /// The backend PyTorch DDP would use for tensors on `device`.
    pub fn for_device(device: tch::Device) -> Self {
        match device {
            tch::Device::Cuda(_) => Self::Nccl,
            _ => Self::Gloo,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gloo => "gloo",
            Self::Nccl => "nccl",
        }
    }
}

/// Ends the process with `code` now. While an aborted group is still being closed on a thread
/// of its own (its backend waiting out a collective with a peer that is gone), the C++ static
/// destructors that a normal exit runs could pull its state away under it and abort the
/// process: such an exit skips them (stdout and stderr are flushed first). Otherwise a normal
/// exit.
#[allow(unsafe_code)]
pub fn exit(code: i32) -> ! {
    use std::io::Write;
    // SAFETY: a counter read.
    if unsafe { ffi::axial_groups_closing() } > 0 {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: ends the process at once; nothing of ours needs running after this point.
        unsafe { libc::_exit(code) }
    }
    std::process::exit(code)
}

/// Whether this build has the NCCL backend (built against the CUDA libtorch with its headers).
#[allow(unsafe_code)]
pub fn nccl_compiled() -> bool {
    // SAFETY: a constant query.
    unsafe { ffi::axial_nccl_compiled() != 0 }
}

/// A c10d process group (Gloo or NCCL backend).
pub struct ProcessGroup {
    pub(crate) ptr: *mut c_void,
    rank: usize,
    world: usize,
    backend: Backend,
    /// Gloo: the sockets the group opened (its listener and its connections to the peers), as
    /// (descriptor, socket inode), so that [`Self::abort`] can cut them.
    sockets: Vec<(i32, u64)>,
}

/// The sockets in `now` that are new since `before` and are TCP (IPv4 or IPv6): a group's
/// connections to its peers. A new descriptor of a socket that was already open is not new: a
/// runtime starting on another thread meanwhile duplicates its signal self-pipe (a Unix socket
/// every tokio runtime of the process shares), and shutting that down on abort ended every
/// runtime in the process ("EOF on self-pipe").
fn opened_tcp_sockets(before: &[(i32, u64)], now: Vec<(i32, u64)>) -> Vec<(i32, u64)> {
    now.into_iter()
        .filter(|(_, inode)| !before.iter().any(|(_, old)| old == inode))
        .filter(|&(fd, _)| is_tcp(fd))
        .collect()
}

/// Whether `fd` is a TCP socket.
#[allow(unsafe_code)]
fn is_tcp(fd: i32) -> bool {
    let option = |name: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with an out-buffer of the right size; it only reads the socket's
        // options (an fd that is no socket, or closed, fails with ENOTSOCK or EBADF).
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        } == 0;
        ok.then_some(value)
    };
    matches!(
        option(libc::SO_DOMAIN),
        Some(libc::AF_INET | libc::AF_INET6)
    ) && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// This process's socket descriptors and their inodes (from /proc/self/fd).
fn socket_inodes() -> Vec<(i32, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("backend", &self.backend)
            .finish()
    }
}

// c10d backends are thread-safe (ProcessGroupGloo queues work on its own threads); the shim's
// Group is immutable after creation.
#[allow(unsafe_code)]
unsafe impl Send for ProcessGroup {}
#[allow(unsafe_code)]
unsafe impl Sync for ProcessGroup {}

/// Runs a shim constructor (null on failure) with an error buffer.
pub(crate) fn create(
    op: &'static str,
    rank: usize,
    world: usize,
    f: impl FnOnce(*mut c_char, usize) -> *mut c_void,
) -> Result<*mut c_void, CollectiveError> {
    let mut ptr = std::ptr::null_mut();
    call(op, rank, world, |err, len| {
        ptr = f(err, len);
        if ptr.is_null() { 1 } else { 0 }
    })?;
    Ok(ptr)
}

/// Runs a shim call with an error buffer.
pub(crate) fn call(
    op: &'static str,
    rank: usize,
    world: usize,
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<(), CollectiveError> {
    let mut err = ErrorBuf::new();
    let (ptr, len) = err.raw();
    if f(ptr, len) == 0 {
        return Ok(());
    }
    Err(CollectiveError {
        op,
        rank,
        world,
        message: err.text(),
    })
}

impl ProcessGroup {
    /// Joins a Gloo group through `store`, its device bound to `local`; blocks until every
    /// rank has joined (or the store's timeout passes).
    #[allow(unsafe_code)]
    pub fn gloo(store: &Store, local: &Local) -> Result<Self, CollectiveError> {
        let (rank, world) = (store.rank, store.world);
        let text = |s: &str| {
            CString::new(s).map_err(|_| CollectiveError {
                op: "init",
                rank,
                world,
                message: format!("{s:?} contains a NUL byte"),
            })
        };
        let (host, iface) = match local {
            Local::Host(h) => (text(h)?, text("")?),
            Local::Interface(i) => (text("")?, text(i)?),
        };
        let before = socket_inodes();
        let ptr = create("init", rank, world, |err, len| {
            // SAFETY: the store pointer is live; the shim takes its own reference.
            unsafe {
                ffi::axial_gloo_new(
                    store.ptr,
                    host.as_ptr(),
                    iface.as_ptr(),
                    rank as c_int,
                    world as c_int,
                    store.timeout.as_millis() as i64,
                    err,
                    len,
                )
            }
        })?;
        // Gloo connects every pair before the constructor returns: the TCP sockets new now are
        // its own (another thread's connection caught here would only be made to reconnect by
        // an abort).
        let opened = opened_tcp_sockets(&before, socket_inodes());
        Ok(Self {
            ptr,
            rank,
            world,
            backend: Backend::Gloo,
            sockets: opened,
        })
    }

    /// Joins an NCCL group through `store`, bound to CUDA device `device` (which becomes the
    /// calling thread's current device): one GPU per rank. Fails with the reason on a machine
    /// without that GPU or a build without NCCL.
    #[allow(unsafe_code)]
    pub fn nccl(store: &Store, device: usize) -> Result<Self, CollectiveError> {
        let (rank, world) = (store.rank, store.world);
        let ptr = create("init", rank, world, |err, len| {
            // SAFETY: the store pointer is live; the shim takes its own reference.
            unsafe {
                ffi::axial_nccl_new(
                    store.ptr,
                    rank as c_int,
                    world as c_int,
                    device as c_int,
                    store.timeout.as_millis() as i64,
                    err,
                    len,
                )
            }
        })?;
        Ok(Self {
            ptr,
            rank,
            world,
            backend: Backend::Nccl,
            sockets: Vec::new(),
        })
    }

    /// Joins the group of `backend` through `store`: Gloo on `local`, NCCL on `device`'s GPU
    /// (CUDA device 0 when `device` is not a CUDA one).
    pub fn new(
        store: &Store,
        backend: Backend,
        local: &Local,
        device: tch::Device,
    ) -> Result<Self, CollectiveError> {
        match backend {
            Backend::Gloo => Self::gloo(store, local),
            Backend::Nccl => Self::nccl(
                store,
                match device {
                    tch::Device::Cuda(i) => i,
                    _ => 0,
                },
            ),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// In-place sum over ranks, one coalesced collective for the whole list (same dtype,
    /// contiguous, dense).
    #[allow(unsafe_code)]
    pub fn allreduce_sum(&self, tensors: &[Tensor]) -> Result<(), CollectiveError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        call("all-reduce", self.rank, self.world, |err, len| {
            // SAFETY: the pointers are live at::Tensor* for the duration of the call.
            unsafe {
                ffi::axial_allreduce_sum(self.ptr, ptrs.as_ptr(), ptrs.len() as c_int, err, len)
            }
        })
    }

    /// In-place broadcast of `tensor` from `root`.
    #[allow(unsafe_code)]
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), CollectiveError> {
        call("broadcast", self.rank, self.world, |err, len| {
            // SAFETY: a live at::Tensor* for the duration of the call.
            unsafe {
                ffi::axial_broadcast(
                    self.ptr,
                    tensor.as_ptr() as *mut c_void,
                    root as c_int,
                    err,
                    len,
                )
            }
        })
    }

    /// Sum over ranks that autograd goes through: the backward pass sums the gradients over
    /// ranks too (a differentiable all-reduce, for synchronized batch norm). Every rank must
    /// call it, and run its backward, in the same order.
    #[allow(unsafe_code)]
    pub fn allreduce_sum_differentiable(&self, x: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut out: *mut c_void = std::ptr::null_mut();
        call(
            "differentiable all-reduce",
            self.rank,
            self.world,
            |err, len| {
                // SAFETY: x is a live at::Tensor*; on success *out is a new heap at::Tensor.
                unsafe {
                    ffi::axial_allreduce_sum_autograd(
                        self.ptr,
                        x.as_ptr() as *mut c_void,
                        &mut out,
                        err,
                        len,
                    )
                }
            },
        )?;
        // SAFETY: `out` is a fresh at::Tensor* whose ownership passes to the Tensor.
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }

    /// Seconds spent in [`ProcessGroup::allreduce_sum_differentiable`] (forward and backward)
    /// since the group formed: the synchronized batch norms' share of a step, most of it
    /// waiting for slower ranks.
    #[allow(unsafe_code)]
    pub fn sync_wait_seconds(&self) -> f64 {
        // SAFETY: the group pointer is live until drop; the counter is atomic.
        unsafe { ffi::axial_group_sync_wait_seconds(self.ptr) }
    }

    /// Whether the group's sums (the synchronized norms', the gradient buckets', the running
    /// statistics') go through shared memory: every rank runs on this host (the same boot and
    /// network, mount and IPC namespaces) and `AXIAL_SHM` is not `0`. Otherwise they take the
    /// backend (Gloo over TCP). Broadcasts and barriers always take the backend.
    #[allow(unsafe_code)]
    pub fn shared_memory(&self) -> bool {
        // SAFETY: the group pointer is live until drop.
        unsafe { ffi::axial_group_shared_memory(self.ptr) != 0 }
    }

    /// How many synchronized-norm all-reduces (forward and backward, the fused attention
    /// core's included) the group has run since it formed.
    #[allow(unsafe_code)]
    pub fn sync_calls(&self) -> u64 {
        // SAFETY: the group pointer is live until drop; the counter is atomic.
        unsafe { ffi::axial_group_sync_calls(self.ptr) }
    }

    /// Ends the group from any thread: collectives waiting in it (on a hung peer, say) fail at
    /// once, and so does every later one. For a generation the coordinator has ended.
    ///
    /// Gloo has no abort of its own: its connections would stay open, and a peer that sends
    /// the rest of an old collective later (a link that comes back) would reach a group that
    /// expects something else, which Gloo answers by ending the process. So the group's
    /// sockets are shut down here (each checked to be the same socket still): its pending work
    /// fails at once, the peers see the connection close, and the group can be freed.
    #[allow(unsafe_code)]
    pub fn abort(&self) {
        // SAFETY: the group pointer is live until drop; the shim's abort is thread-safe.
        unsafe { ffi::axial_group_abort(self.ptr) }
        if self.sockets.is_empty() {
            return;
        }
        let now = socket_inodes();
        for socket in &self.sockets {
            if !now.contains(socket) {
                continue;
            }
            // The listener stays: Gloo treats a failed accept as fatal. Its connections go.
            let mut listening: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt and shutdown on a descriptor that is still this group's
            // socket, with an out-buffer of the right size; shutdown does not close the
            // descriptor, which Gloo still owns.
            unsafe {
                let ok = libc::getsockopt(
                    socket.0,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut listening as *mut libc::c_int).cast(),
                    &mut len,
                ) == 0;
                if ok && listening == 0 {
                    libc::shutdown(socket.0, libc::SHUT_RDWR);
                }
            }
        }
    }

    #[allow(unsafe_code)]
    pub fn barrier(&self) -> Result<(), CollectiveError> {
        call("barrier", self.rank, self.world, |err, len| {
            // SAFETY: the group pointer is live until drop.
            unsafe { ffi::axial_barrier(self.ptr, err, len) }
        })
    }
}

impl Drop for ProcessGroup {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: created by axial_gloo_new or axial_nccl_new, freed once.
        unsafe { ffi::axial_group_free(self.ptr) }
    }
}
