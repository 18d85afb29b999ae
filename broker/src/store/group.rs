//! Release decisions: their inputs read from a cache the store keeps valid, and their writes
//! (the nonce spend and the audit record) committed in groups by one writer task per store.
//!
//! A decision reads the active policy and the secrets it names as of a *generation*: a
//! random token that every write to secrets or policies replaces, in the same transaction
//! (re-encrypting records under a new data key excepted: it changes no plaintext).
//! The writer task commits a group of decisions in one transaction (one fsync): it reads the
//! generation first (on PostgreSQL with a share lock, so a concurrent write to secrets or
//! policies waits for the group), and a decision made on another generation is not written
//! but answered [`Committed::Stale`], to be decided again on fresh inputs. So every answered
//! release was decided on the secrets and policy current when its nonce spend committed,
//! and no answer leaves before its group is durable.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{mpsc, oneshot};

use super::{AuditRecord, PolicyRef, StoreError, StoredSecret};

/// Most decisions committed in one transaction.
pub(crate) const MAX_GROUP: usize = 64;
/// Decisions waiting for the writer before callers wait to queue (back-pressure).
const QUEUE: usize = 4096;
/// Secret names the input cache remembers before it starts over.
const CACHE_NAMES: usize = 1024;

/// What a release decision reads from the store.
#[derive(Debug)]
pub struct DecisionInputs {
    /// The store generation these inputs are current for.
    pub generation: i64,
    /// The active policy, if one is set.
    pub policy: Option<PolicyRef>,
    /// The current version of each secret asked for, in order (`None`: no such secret).
    pub secrets: Vec<Option<StoredSecret>>,
}

/// A decision to make durable: its nonce spent, on the generation its inputs came from.
#[derive(Clone, Debug)]
pub struct Spend {
    /// SHA-256 of the nonce to spend; `None` for a decision that spends none (a KBS
    /// resource request, made on an attestation whose nonce was spent already): it is
    /// still checked against the generation and audited in the group.
    pub nonce: Option<[u8; 32]>,
    /// When the nonce expires (seconds since the epoch), for purging.
    pub expires_at: i64,
    /// [`DecisionInputs::generation`] of the inputs the decision was made on.
    pub generation: i64,
    /// Certificates the decision issued, recorded with it.
    pub issued: Vec<IssuedRecord>,
}

/// A certificate the private CA issued, as the store records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IssuedRecord {
    /// Serial number (hex, lowercase).
    pub serial: String,
    /// The CA version that issued it.
    pub ca_version: u64,
    /// The policy profile.
    pub profile: String,
    /// Subject common name.
    pub subject: String,
    /// Its names (`dns:…`, `ip:…`, `uri:…`).
    pub names: Vec<String>,
    /// SHA-256 of the claims it was issued on (hex), as in the audit record.
    pub claims_digest: String,
    /// The claims it was issued on (JSON), to decide again when the policy changes.
    #[serde(skip)]
    pub claims: serde_json::Value,
    /// Validity (seconds since the epoch).
    pub not_before: i64,
    /// Validity (seconds since the epoch).
    pub not_after: i64,
    /// When it was issued (seconds since the epoch).
    pub issued_at: i64,
    /// The certificate (DER).
    #[serde(skip)]
    pub certificate: Vec<u8>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
    /// Why (RFC 5280 reason keyword), if revoked.
    pub revocation_reason: Option<String>,
}

/// How a decision's commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Committed {
    /// The nonce is spent and the audit record appended, durably.
    Done,
    /// The nonce was spent already: nothing written.
    Replay,
    /// Secrets or policies changed since the inputs were read: nothing written; decide
    /// again on fresh inputs.
    Stale,
}

/// Group commit metrics, registered by the server.
#[derive(Clone, Debug)]
pub struct CommitMetrics {
    /// Decisions per committed group.
    pub group_size: Histogram,
    /// Time to commit one group (the transaction and its fsync), seconds.
    pub commit_seconds: Histogram,
    /// Decisions answered [`Committed::Stale`].
    pub stale: Counter,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        CommitMetrics {
            // 1, 2, 4, … 64.
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 7)),
            // 50 µs … ~1.6 s.
            commit_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            stale: Counter::default(),
        }
    }
}

/// One decision waiting for its group.
pub(crate) struct Pending {
    pub(crate) spend: Spend,
    pub(crate) audit: AuditRecord,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// A store's decision machinery: the queue to its writer task, the input cache, metrics.
#[derive(Clone)]
pub(crate) struct Decisions {
    queue: Option<mpsc::Sender<Pending>>,
    pub(crate) cache: Arc<InputCache>,
    pub(crate) metrics: CommitMetrics,
}

impl std::fmt::Debug for Decisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decisions(..)")
    }
}

impl Decisions {
    /// Without a writer yet: the engine's copy that the writer task itself holds.
    pub(crate) fn detached() -> Decisions {
        Decisions {
            queue: None,
            cache: Arc::new(InputCache::default()),
            metrics: CommitMetrics::default(),
        }
    }

    /// Starts the writer task, which commits each group with `commit` (one transaction,
    /// answers in the group's order) and ends when every handle is dropped.
    pub(crate) fn start<F, Fut>(mut self, commit: F) -> Decisions
    where
        F: Fn(Vec<(Spend, AuditRecord)>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Committed>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE);
        let metrics = self.metrics.clone();
        let cache = self.cache.clone();
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(MAX_GROUP);
            // Whatever arrived while the previous group committed forms the next one.
            while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
                let (work, replies): (Vec<_>, Vec<_>) = group
                    .drain(..)
                    .map(|p: Pending| ((p.spend, p.audit), p.reply))
                    .unzip();
                let size = work.len();
                let started = Instant::now();
                let result = commit(work).await;
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                // usize → f64 for a histogram of at most MAX_GROUP.
                #[allow(clippy::cast_precision_loss)]
                metrics.group_size.observe(size as f64);
                match result {
                    Ok(outcomes) if outcomes.len() == replies.len() => {
                        if outcomes.contains(&Committed::Stale) {
                            cache.invalidate();
                        }
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            if outcome == Committed::Stale {
                                metrics.stale.inc();
                            }
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Ok(_) => {
                        for reply in replies {
                            let _ = reply.send(Err(StoreError::Unavailable(
                                "group commit answered the wrong number of decisions".into(),
                            )));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, decisions = size, "group commit failed");
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        self.queue = Some(tx);
        self
    }

    /// Queues a decision for the next group and waits until that group is committed (or
    /// failed: then nothing of it was written).
    pub(crate) async fn commit(
        &self,
        spend: Spend,
        audit: AuditRecord,
    ) -> Result<Committed, StoreError> {
        let closed = || StoreError::Unavailable("the store's writer has stopped".into());
        let queue = self.queue.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        queue
            .send(Pending {
                spend,
                audit,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// The policy and secrets as of one generation, filled as decisions ask.
#[derive(Debug, Default)]
pub(crate) struct InputCache {
    state: RwLock<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    generation: Option<i64>,
    /// `Some(None)`: known to have no policy.
    policy: Option<Option<(u64, Arc<str>)>>,
    secrets: HashMap<String, Option<StoredSecret>>,
}

/// What a decision still has to read from the database.
pub(crate) struct Misses {
    /// The generation is unknown: read it first.
    pub(crate) generation: Option<i64>,
    /// The policy is unknown.
    pub(crate) policy: bool,
    /// Names not cached.
    pub(crate) names: Vec<String>,
}

/// Values read from the database for [`InputCache::fill`].
pub(crate) struct Loaded {
    pub(crate) generation: i64,
    pub(crate) policy: Option<Option<(u64, String)>>,
    pub(crate) secrets: Vec<(String, Option<StoredSecret>)>,
}

impl InputCache {
    /// Forgets everything: the next decision reads the generation and its inputs again.
    pub(crate) fn invalidate(&self) {
        if let Ok(mut s) = self.state.write() {
            *s = CacheState::default();
        }
    }

    /// The inputs of a decision on `names` when the cache has them all: the hot path, under
    /// a read lock only.
    pub(crate) fn cached(
        &self,
        names: &[String],
        cached_policy: Option<u64>,
    ) -> Option<DecisionInputs> {
        let s = self.state.read().ok()?;
        let generation = s.generation?;
        let policy = s.policy.clone()?.map(|(version, document)| PolicyRef {
            version,
            document: (cached_policy != Some(version)).then(|| document.to_string()),
        });
        let secrets = names
            .iter()
            .map(|n| s.secrets.get(n).cloned())
            .collect::<Option<Vec<_>>>()?;
        Some(DecisionInputs {
            generation,
            policy,
            secrets,
        })
    }

    /// What is missing for a decision on `names`.
    pub(crate) fn misses(&self, names: &[String]) -> Misses {
        let Ok(s) = self.state.read() else {
            return Misses {
                generation: None,
                policy: true,
                names: names.to_vec(),
            };
        };
        if s.generation.is_none() {
            return Misses {
                generation: None,
                policy: true,
                names: names.to_vec(),
            };
        }
        Misses {
            generation: s.generation,
            policy: s.policy.is_none(),
            names: names
                .iter()
                .filter(|n| !s.secrets.contains_key(*n))
                .cloned()
                .collect(),
        }
    }

    /// Adds what was read (values read *after* the generation, so they are at least as new
    /// as it says: a write in between replaced the generation, and the commit will find
    /// these inputs stale) and answers the decision's inputs from it and the cache; `None`
    /// when the cache moved to another generation meanwhile and lacks some input (then read
    /// everything).
    pub(crate) fn fill(
        &self,
        loaded: Loaded,
        names: &[String],
        cached_policy: Option<u64>,
    ) -> Option<DecisionInputs> {
        let mut s = match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => {
                let mut s = poisoned.into_inner();
                *s = CacheState::default();
                s
            }
        };
        if s.generation != Some(loaded.generation) {
            *s = CacheState {
                generation: Some(loaded.generation),
                ..CacheState::default()
            };
        }
        if let Some(policy) = loaded.policy {
            s.policy = Some(policy.map(|(v, d)| (v, Arc::from(d))));
        }
        if s.secrets.len() + loaded.secrets.len() > CACHE_NAMES {
            s.secrets.clear();
        }
        let mut fresh: HashMap<&str, &Option<StoredSecret>> = HashMap::new();
        for (name, secret) in &loaded.secrets {
            fresh.insert(name, secret);
        }
        let mut secrets = Vec::with_capacity(names.len());
        for n in names {
            secrets.push(match fresh.get(n.as_str()) {
                Some(v) => (*v).clone(),
                None => s.secrets.get(n)?.clone(),
            });
        }
        for (name, secret) in loaded.secrets {
            s.secrets.insert(name, secret);
        }
        let policy = s.policy.clone()?.map(|(version, document)| PolicyRef {
            version,
            document: (cached_policy != Some(version)).then(|| document.to_string()),
        });
        Some(DecisionInputs {
            generation: loaded.generation,
            policy,
            secrets,
        })
    }
}
