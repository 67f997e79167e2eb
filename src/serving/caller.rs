//! Who asked: a caller that names its presence group (`harness.caller.<id>`,
//! one member per client) is gone once the group has no member here, which
//! ractor_cluster arranges when the caller's session closes. A generation asks
//! at each step, so a caller that dies frees its sequence slot at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::tasks::Caller;

/// Longest group name taken (a caller's own, `harness.caller.` and an id).
const MAX_GROUP_BYTES: usize = 256;

/// A caller known by its presence group.
struct GroupCaller {
    group: String,
    /// The group was seen with a member: only then does an empty group mean
    /// the caller left (rather than that its group has not reached this node).
    seen: AtomicBool,
}

impl Caller for GroupCaller {
    fn gone(&self) -> bool {
        if !ractor::pg::get_members(&self.group).is_empty() {
            self.seen.store(true, Ordering::Relaxed);
            return false;
        }
        self.seen.load(Ordering::Relaxed)
    }
}

/// The caller a request names, if it names one this node can watch.
pub fn named(group: Option<&str>) -> Option<Arc<dyn Caller>> {
    let group = group.filter(|g| !g.is_empty() && g.len() <= MAX_GROUP_BYTES)?;
    let caller = GroupCaller {
        group: group.to_string(),
        seen: AtomicBool::new(false),
    };
    // Seen now, if it is here now.
    caller.gone();
    Some(Arc::new(caller))
}
