//! The collective's rendezvous store: the key-value store through which c10d's process groups
//! bootstrap (Gloo ranks exchange their addresses, NCCL rank 0 hands out its unique id), kept by
//! the coordinator for the running generation only.
//!
//! PyTorch hosts it as a TCPStore on rank 0: an unauthenticated port where anyone who finds it
//! can read, overwrite, delete and (since torch 2.4) list every key. Here it lives behind the
//! control plane instead: every operation carries the job token (and TLS when configured), and
//! the coordinator serves it only to members of the generation it belongs to. A new generation
//! starts with an empty store and the old one is dropped, so nothing leaks from one to the next.
//!
//! Plain data, no sockets: the gRPC service (`service.rs`) translates `Store` calls into
//! [`Rendezvous::apply`] and does the waiting.

use std::collections::HashMap;

/// Largest value a key may hold (Gloo's addresses and NCCL's unique id are far smaller).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Keys per generation (Gloo's full mesh needs a few per rank pair).
pub const MAX_KEYS: usize = 1 << 20;

/// One operation, as c10d's `Store` defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// The value, if set (the service waits for it).
    Get {
        key: String,
    },
    Add {
        key: String,
        amount: i64,
    },
    /// Whether every key is set (the service's WAIT is CHECK repeated until true).
    Check {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Value(Option<Vec<u8>>),
    Number(i64),
    Flag(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Full(String),
}

/// The store of one generation.
#[derive(Debug, Default)]
pub struct Rendezvous {
    generation: u64,
    keys: HashMap<String, Vec<u8>>,
    bytes: usize,
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StoreError::Invalid(format!(
            "a store key must have 1..={MAX_KEY_BYTES} bytes, not {}",
            key.len()
        )));
    }
    Ok(())
}

impl Rendezvous {
    /// The store of `generation`: the current one, or a fresh, empty one when the generation
    /// has changed (the old generation's keys are dropped).
    fn of(&mut self, generation: u64) -> &mut Self {
        if self.generation != generation {
            *self = Self {
                generation,
                ..Self::default()
            };
        }
        self
    }

    /// Drops every key (the generation ended).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Keys held now (for the status page).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::Invalid(format!(
                "a store value may hold {MAX_VALUE_BYTES} bytes, not {}",
                value.len()
            )));
        }
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            return Err(StoreError::Full(format!(
                "the rendezvous store holds {MAX_KEYS} keys already"
            )));
        }
        self.bytes += value.len();
        if let Some(old) = self.keys.insert(key, value) {
            self.bytes -= old.len();
        }
        Ok(())
    }

    /// Applies `op` to the store of `generation` (the caller has checked that the generation
    /// is running and the caller is one of its members).
    pub fn apply(&mut self, generation: u64, op: Op) -> Result<Outcome, StoreError> {
        let s = self.of(generation);
        Ok(match op {
            Op::Set { key, value } => {
                check_key(&key)?;
                s.put(key, value)?;
                Outcome::Done
            }
            Op::Get { key } => Outcome::Value(s.keys.get(&key).cloned()),
            Op::Add { key, amount } => {
                check_key(&key)?;
                let now = match s.keys.get(&key) {
                    None => 0,
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok())
                        .ok_or_else(|| {
                            StoreError::Invalid(format!("{key:?} does not hold an integer"))
                        })?,
                };
                let sum = now.checked_add(amount).ok_or_else(|| {
                    StoreError::Invalid(format!("{key:?}: {now} + {amount} overflows"))
                })?;
                s.put(key, sum.to_string().into_bytes())?;
                Outcome::Number(sum)
            }
            Op::Check { keys } => Outcome::Flag(keys.iter().all(|k| s.keys.contains_key(k))),
            Op::Delete { key } => {
                let gone = s.keys.remove(&key);
                if let Some(v) = &gone {
                    s.bytes -= v.len();
                }
                Outcome::Flag(gone.is_some())
            }
            Op::CompareSet {
                key,
                expected,
                value,
            } => {
                check_key(&key)?;
                // c10d: an unset key is swapped only when `expected` is empty; the reply is the
                // value held afterwards (`expected` itself for an unset key left alone).
                match s.keys.get(&key) {
                    None if expected.is_empty() => {
                        s.put(key, value.clone())?;
                        Outcome::Value(Some(value))
                    }
                    None => Outcome::Value(Some(expected)),
                    Some(current) if *current == expected => {
                        s.put(key, value.clone())?;
                        Outcome::Value(Some(value))
                    }
                    Some(current) => Outcome::Value(Some(current.clone())),
                }
            }
            Op::NumKeys => Outcome::Number(s.keys.len() as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(k: &str, v: &[u8]) -> Op {
        Op::Set {
            key: k.into(),
            value: v.to_vec(),
        }
    }

    #[test]
    fn operations_follow_c10d_store_semantics() {
        let mut r = Rendezvous::default();
        assert_eq!(r.apply(3, set("a", b"1")), Ok(Outcome::Done));
        assert_eq!(
            r.apply(3, Op::Get { key: "a".into() }),
            Ok(Outcome::Value(Some(b"1".to_vec())))
        );
        assert_eq!(
            r.apply(3, Op::Get { key: "b".into() }),
            Ok(Outcome::Value(None))
        );
        let add = |n| Op::Add {
            key: "n".into(),
            amount: n,
        };
        assert_eq!(r.apply(3, add(2)), Ok(Outcome::Number(2)));
        assert_eq!(r.apply(3, add(5)), Ok(Outcome::Number(7)));
        assert!(
            r.apply(
                3,
                Op::Add {
                    key: "a".into(),
                    amount: i64::MAX
                }
            )
            .is_err()
        );
        assert_eq!(
            r.apply(
                3,
                Op::Check {
                    keys: vec!["a".into(), "n".into()]
                }
            ),
            Ok(Outcome::Flag(true))
        );
        assert_eq!(
            r.apply(
                3,
                Op::Check {
                    keys: vec!["a".into(), "zz".into()]
                }
            ),
            Ok(Outcome::Flag(false))
        );
        let cas = |expected: &[u8], value: &[u8]| Op::CompareSet {
            key: "c".into(),
            expected: expected.to_vec(),
            value: value.to_vec(),
        };
        assert_eq!(
            r.apply(3, cas(b"x", b"y")),
            Ok(Outcome::Value(Some(b"x".to_vec())))
        );
        assert_eq!(
            r.apply(3, cas(b"", b"y")),
            Ok(Outcome::Value(Some(b"y".to_vec())))
        );
        assert_eq!(
            r.apply(3, cas(b"q", b"z")),
            Ok(Outcome::Value(Some(b"y".to_vec())))
        );
        assert_eq!(r.apply(3, Op::NumKeys), Ok(Outcome::Number(3)));
        assert_eq!(
            r.apply(3, Op::Delete { key: "a".into() }),
            Ok(Outcome::Flag(true))
        );
        assert_eq!(
            r.apply(3, Op::Delete { key: "a".into() }),
            Ok(Outcome::Flag(false))
        );
        assert_eq!(r.len(), 2);
    }

    /// A new generation never sees the keys of the one before.
    #[test]
    fn each_generation_starts_empty() {
        let mut r = Rendezvous::default();
        r.apply(3, set("rank0", b"10.0.0.1")).expect("set");
        assert_eq!(
            r.apply(
                4,
                Op::Get {
                    key: "rank0".into()
                }
            ),
            Ok(Outcome::Value(None))
        );
        assert_eq!(r.apply(4, Op::NumKeys), Ok(Outcome::Number(0)));
    }

    #[test]
    fn oversized_keys_and_values_are_refused() {
        let mut r = Rendezvous::default();
        assert!(r.apply(1, set("", b"x")).is_err());
        assert!(
            r.apply(1, set(&"k".repeat(MAX_KEY_BYTES + 1), b"x"))
                .is_err()
        );
        assert!(
            r.apply(1, set("big", &vec![0; MAX_VALUE_BYTES + 1]))
                .is_err()
        );
        assert!(r.is_empty());
    }
}
