//! The collective's rendezvous store as the worker reaches it: the coordinator's store of the
//! running generation (`coordinator/src/rendezvous.rs`), behind the job token and, when
//! configured, TLS. It is what c10d's process groups bootstrap through ([`KeyValue`] under a
//! c10d Store, `csrc/kv_store.cpp`), so no worker listens for a store, and a stranger who finds
//! a worker's ports finds no keys to read, change or delete.
//!
//! Calls may come from any thread of the process group at once; each runs on this store's own
//! small runtime. GET and WAIT are long polls (the coordinator answers when the keys are set, or
//! after a few seconds, and the store asks again until its timeout). A coordinator that is out
//! of reach for a moment is retried until then; one that says the generation is over fails the
//! call at once, and so does the liveness thread's abort flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axial_proto::v1::coordinator_client::CoordinatorClient;
use axial_proto::v1::{StoreRequest, store_request::Op};
use tonic::transport::Endpoint;

use crate::collective::{KeyValue, KvOp, KvReply};
use crate::join::{Client, Token};

/// How long one GET or WAIT call waits at the coordinator before asking again.
const POLL: Duration = Duration::from_secs(5);
/// Slack on top of a call's own wait for its deadline.
const SLACK: Duration = Duration::from_secs(10);

pub(crate) struct CoordinatorStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    worker_id: String,
    generation: u64,
    /// Set when the coordinator has ended the generation (the liveness thread).
    ended: Arc<AtomicBool>,
}

impl CoordinatorStore {
    pub(crate) fn connect(
        endpoint: &Endpoint,
        token: Token,
        worker_id: &str,
        generation: u64,
        ended: Arc<AtomicBool>,
    ) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rendezvous")
            .enable_all()
            .build()
            .map_err(|e| format!("rendezvous store runtime: {e}"))?;
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| format!("rendezvous store: cannot reach the coordinator: {e}"))?;
        Ok(Self {
            client: CoordinatorClient::with_interceptor(channel, token),
            rt,
            worker_id: worker_id.to_owned(),
            generation,
            ended,
        })
    }

    fn request(&self, op: &KvOp, wait: Duration) -> StoreRequest {
        let mut r = StoreRequest {
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            ..Default::default()
        };
        let (code, keys) = match op {
            KvOp::Set { key, value } => {
                r.value.clone_from(value);
                (Op::Set, vec![key.clone()])
            }
            KvOp::Get { key } => (Op::Get, vec![key.clone()]),
            KvOp::Add { key, amount } => {
                r.amount = *amount;
                (Op::Add, vec![key.clone()])
            }
            KvOp::Check { keys } => (Op::Check, keys.clone()),
            KvOp::Wait { keys } => (Op::Wait, keys.clone()),
            KvOp::Delete { key } => (Op::Delete, vec![key.clone()]),
            KvOp::CompareSet {
                key,
                expected,
                value,
            } => {
                r.expected.clone_from(expected);
                r.value.clone_from(value);
                (Op::CompareSet, vec![key.clone()])
            }
            KvOp::NumKeys => (Op::NumKeys, Vec::new()),
        };
        r.op = code as i32;
        r.keys = keys;
        r
    }
}

impl KeyValue for CoordinatorStore {
    fn apply(&self, op: KvOp, timeout: Duration) -> Result<KvReply, String> {
        let waits = matches!(op, KvOp::Get { .. } | KvOp::Wait { .. });
        let deadline = Instant::now() + timeout;
        loop {
            if self.ended.load(Ordering::Relaxed) {
                return Err(format!(
                    "aborted: the coordinator ended generation {}",
                    self.generation
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if waits {
                left.min(POLL)
            } else {
                Duration::ZERO
            };
            let mut request = tonic::Request::new(self.request(&op, wait));
            request.set_timeout(wait + SLACK);
            let mut client = self.client.clone();
            match self.rt.block_on(client.store(request)) {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let result = match &op {
                        KvOp::Set { .. } => KvReply::Done,
                        KvOp::Get { .. } if reply.found => KvReply::Value(reply.value),
                        KvOp::Wait { .. } if reply.number == 1 => KvReply::Done,
                        KvOp::Get { .. } | KvOp::Wait { .. } => {
                            if Instant::now() >= deadline {
                                return Ok(KvReply::TimedOut);
                            }
                            continue;
                        }
                        KvOp::CompareSet { .. } => KvReply::Value(reply.value),
                        KvOp::Add { .. }
                        | KvOp::Check { .. }
                        | KvOp::Delete { .. }
                        | KvOp::NumKeys => KvReply::Number(reply.number),
                    };
                    return Ok(result);
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) && Instant::now() < deadline =>
                {
                    // The coordinator is out of reach for a moment: ask again.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
            }
        }
    }
}
