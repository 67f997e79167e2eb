//! Who asked: a caller that names its presence group (`harness.caller.<id>`,
//! one member per client) is gone once the group has no member here, which
//! ractor_cluster arranges when the caller's session closes. A generation asks
//! at each step, so a caller that dies frees its sequence slot at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::tasks::Caller;

/// Longest group name taken (a caller's own, `harness.caller.` and an id).
const MAX_GROUP_BYTES: usize = 256;
/// How often a caller's group is looked at, at most: the engine asks at every
/// step, for every sequence, and a look allocates.
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// A caller known by its presence group.
struct GroupCaller {
    group: String,
    /// The group was seen with a member: only then does an empty group mean
    /// the caller left (rather than that its group has not reached this node).
    seen: AtomicBool,
    gone: AtomicBool,
    /// When the group was last looked at ([`now_ms`]).
    looked_ms: AtomicU64,
}

impl GroupCaller {
    fn look(&self) -> bool {
        if !ractor::pg::get_members(&self.group).is_empty() {
            self.seen.store(true, Ordering::Relaxed);
            return false;
        }
        self.seen.load(Ordering::Relaxed)
    }
}

impl Caller for GroupCaller {
    fn gone(&self) -> bool {
        let now = now_ms();
        let looked = self.looked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(looked) >= LOOK_EVERY.as_millis() as u64 {
            self.looked_ms.store(now, Ordering::Relaxed);
            self.gone.store(self.look(), Ordering::Relaxed);
        }
        self.gone.load(Ordering::Relaxed)
    }
}

/// Milliseconds since the first call (a monotonic clock as an integer).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The caller a request names, if it names one this node can watch.
pub fn named(group: Option<&str>) -> Option<Arc<dyn Caller>> {
    let group = group.filter(|g| !g.is_empty() && g.len() <= MAX_GROUP_BYTES)?;
    let caller = GroupCaller {
        group: group.to_string(),
        seen: AtomicBool::new(false),
        gone: AtomicBool::new(false),
        looked_ms: AtomicU64::new(now_ms()),
    };
    // Seen now, if it is here now.
    caller.look();
    Some(Arc::new(caller))
}
