//! One async lock per VM (by host-wide key), kept only while used.
//!
//! Every holder of a VM's lock, and every request waiting for it, is a
//! *user* of the key's entry; the entry is removed with its last user, under
//! the map's mutex. So two requests for one key always share one lock (no
//! entry is dropped under a holder or a waiter, not even after a delete),
//! and the map holds only keys someone is using, however many VMs come and
//! go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::vm::VmId;

/// The per-VM locks. Shared by the service's clones.
#[derive(Default)]
pub(crate) struct VmLocks {
    map: Mutex<HashMap<VmId, Slot>>,
}

struct Slot {
    lock: Arc<AsyncMutex<()>>,
    /// Holders and waiters: the slot goes when this drops to zero.
    users: usize,
}

/// A VM's lock, held. Releases the lock, then lets go of the entry.
pub struct VmLock {
    // Field order is drop order: the lock is released before the entry can
    // be removed, so an entry never goes while its lock is held.
    _guard: OwnedMutexGuard<()>,
    _user: User,
}

/// One use of a key's entry; removes the entry if it was the last.
struct User {
    locks: Arc<VmLocks>,
    id: VmId,
}

impl Drop for User {
    fn drop(&mut self) {
        let mut map = self.locks.entries();
        if let Some(slot) = map.get_mut(&self.id) {
            slot.users -= 1;
            if slot.users == 0 {
                map.remove(&self.id);
            }
        }
    }
}

impl VmLocks {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Slot>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a user of `id`'s entry (making it if needed), at once.
    fn user(self: &Arc<Self>, id: &VmId) -> (User, Arc<AsyncMutex<()>>) {
        let mut map = self.entries();
        let slot = map.entry(id.clone()).or_insert_with(|| Slot {
            lock: Arc::default(),
            users: 0,
        });
        slot.users += 1;
        let lock = slot.lock.clone();
        drop(map);
        let user = User {
            locks: self.clone(),
            id: id.clone(),
        };
        (user, lock)
    }

    /// Waits for `id`'s lock. The caller counts as a user from this call on
    /// (not from the first poll), and stops being one if the future is
    /// dropped before it resolves.
    pub(crate) fn lock(
        self: &Arc<Self>,
        id: &VmId,
    ) -> impl Future<Output = VmLock> + Send + 'static {
        let (user, lock) = self.user(id);
        async move {
            let guard = lock.lock_owned().await;
            VmLock {
                _guard: guard,
                _user: user,
            }
        }
    }

    /// `id`'s lock if no one holds it now.
    pub(crate) fn try_lock(self: &Arc<Self>, id: &VmId) -> Option<VmLock> {
        let (user, lock) = self.user(id);
        let guard = lock.try_lock_owned().ok()?;
        Some(VmLock {
            _guard: guard,
            _user: user,
        })
    }

    /// How many keys have an entry (each has a holder or a waiter).
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> VmId {
        VmId::parse(s, "vm_id").unwrap()
    }

    #[tokio::test]
    async fn an_entry_lives_exactly_as_long_as_its_users() {
        let locks = Arc::new(VmLocks::default());
        let a = locks.lock(&key("a")).await;
        assert!(locks.try_lock(&key("a")).is_none(), "one lock per key");
        let waiting = locks.lock(&key("a"));
        drop(a);
        assert_eq!(locks.len(), 1, "kept for the waiter");
        let b = waiting.await;
        assert!(locks.try_lock(&key("a")).is_none(), "the waiter holds it");
        drop(b);
        assert_eq!(locks.len(), 0);
        // A waiter that gives up lets go of the entry too.
        let held = locks.lock(&key("a")).await;
        drop(locks.lock(&key("a")));
        drop(held);
        assert_eq!(locks.len(), 0);
    }
}
