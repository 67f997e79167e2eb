//! The servings a client can call: the members of the serving's process group,
//! each with its calls in flight and whether it answers pings. A node that hangs
//! keeps its session (TCP stays up, nothing in ractor_cluster notices), so the
//! client asks each serving for its status every second; one that misses two
//! pings in a row is tried only when no other is there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ractor::{ActorId, ActorRef};

use crate::protocol::{serving_group, Payload, ServingMessage, StatusRequest, PROTOCOL_VERSION};

const PING_EVERY: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Missed pings in a row before a serving is suspected of hanging.
const SUSPECT_AFTER: u32 = 2;

/// One serving, as this client sees it.
#[derive(Default)]
pub(crate) struct Member {
    pub in_flight: AtomicUsize,
    missed_pings: AtomicU32,
    /// The node's message limit from its `Status` (0: not known yet).
    message_limit: AtomicU64,
    /// Whether a call has asked for the limit already (later pings keep it).
    limit_asked: std::sync::atomic::AtomicBool,
}

impl Member {
    fn suspect(&self) -> bool {
        self.missed_pings.load(Ordering::Relaxed) >= SUSPECT_AFTER
    }

    /// The largest message the serving's node takes, asked once (its `Status`)
    /// and then kept; `None` if it could not be asked or has no limit to tell.
    pub async fn message_limit(&self, serving: &ActorRef<ServingMessage>) -> Option<u64> {
        let known = self.message_limit.load(Ordering::Relaxed);
        if known > 0 || self.limit_asked.swap(true, Ordering::Relaxed) {
            return Some(known).filter(|l| *l > 0);
        }
        self.ping(serving).await;
        Some(self.message_limit.load(Ordering::Relaxed)).filter(|l| *l > 0)
    }

    /// Asks the serving for its status (with the ping's timeout) and keeps what
    /// it tells of its node; whether it answered.
    async fn ping(&self, serving: &ActorRef<ServingMessage>) -> bool {
        let request = StatusRequest {
            version: PROTOCOL_VERSION,
        };
        let answer = serving
            .call(
                |port| ServingMessage::Status(Payload::new(request), port),
                Some(PING_TIMEOUT),
            )
            .await;
        if let Ok(ractor::rpc::CallResult::Success(Payload(Ok(status)))) = &answer {
            self.message_limit
                .store(status.max_message_bytes, Ordering::Relaxed);
        }
        matches!(answer, Ok(ractor::rpc::CallResult::Success(_)))
    }
}

pub(crate) struct Pool {
    group: String,
    members: Mutex<HashMap<ActorId, Arc<Member>>>,
}

impl Pool {
    /// Tracks the servings named `serving`, pinging them while the pool lives.
    pub fn start(serving: &str) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            group: serving_group(serving),
            members: Mutex::new(HashMap::new()),
        });
        tokio::spawn(ping(Arc::downgrade(&pool)));
        pool
    }

    /// The servings now: answering ones first, then the least busy.
    pub fn servings(&self) -> Vec<(ActorRef<ServingMessage>, Arc<Member>)> {
        let cells = ractor::pg::get_members(&self.group);
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|id, _| cells.iter().any(|c| c.get_id() == *id));
        let mut servings: Vec<_> = cells
            .into_iter()
            .map(|cell| {
                let member = members.entry(cell.get_id()).or_default().clone();
                (ActorRef::<ServingMessage>::from(cell), member)
            })
            .collect();
        servings.sort_by_key(|(_, m)| (m.suspect(), m.in_flight.load(Ordering::Relaxed)));
        servings
    }
}

impl Pool {
    /// Resolves once the serving has gone away: its node's session closed (its
    /// stand-in actor here stopped). A serving that only left the group (it is
    /// draining for shutdown) still answers the calls it took, so it is waited for.
    pub async fn gone(&self, serving: &ActorRef<ServingMessage>) {
        let id = serving.get_id();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let member = ractor::pg::get_members(&self.group)
                .iter()
                .any(|c| c.get_id() == id);
            if !member && serving.get_status() != ractor::ActorStatus::Running {
                return;
            }
        }
    }
}

async fn ping(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(live) = pool.upgrade() else { return };
        let servings = live.servings();
        drop(live);
        for (serving, member) in servings {
            let answered = member.ping(&serving).await;
            if answered {
                member.missed_pings.store(0, Ordering::Relaxed);
            } else if member.missed_pings.fetch_add(1, Ordering::Relaxed) + 1 == SUSPECT_AFTER {
                tracing::warn!(serving = ?serving.get_id(), "a serving stopped answering pings; calls go elsewhere");
            }
        }
    }
}
