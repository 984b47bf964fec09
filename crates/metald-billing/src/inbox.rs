//! The service's notes to the meter task: what each VM's row now says.
//!
//! The service tells billing about every stored change and must never wait
//! for it, so the hand-over cannot be a bounded queue that blocks, nor an
//! unbounded one that grows while the meter task is behind. It is a map
//! with one entry per VM holding that VM's newest change: its size is
//! bounded by the number of VMs, and when full of older news a newer change
//! replaces the older one (the meter task only needs where each VM stands;
//! a start and stop it never saw are reported as one continuous stream).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// One VM's newest change, keyed by the VM's host-wide key.
pub(crate) struct Inbox<T> {
    pending: Mutex<Pending<T>>,
    notify: Notify,
}

struct Pending<T> {
    next: u64,
    by_vm: HashMap<String, (u64, T)>,
    /// Changes that replaced an older one not yet taken (a count for
    /// operators; nothing is lost that the meter task needs).
    coalesced: u64,
    closed: bool,
}

impl<T> Inbox<T> {
    pub(crate) fn new() -> Self {
        Inbox {
            pending: Mutex::new(Pending {
                next: 0,
                by_vm: HashMap::new(),
                coalesced: 0,
                closed: false,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<T>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `vm`'s newest change; never blocks on the meter task. True
    /// when it replaced an older change not yet taken.
    pub(crate) fn put(&self, vm: String, change: T) -> bool {
        let replaced = {
            let mut p = self.lock();
            let seq = p.next;
            p.next += 1;
            let replaced = p.by_vm.insert(vm, (seq, change)).is_some();
            if replaced {
                p.coalesced += 1;
            }
            replaced
        };
        self.notify.notify_one();
        replaced
    }

    /// Every pending change, oldest first; waits while there is none.
    /// `None` once closed and empty.
    pub(crate) async fn take(&self) -> Option<Vec<T>> {
        loop {
            {
                let mut p = self.lock();
                if !p.by_vm.is_empty() {
                    let mut all: Vec<(u64, T)> = p.by_vm.drain().map(|(_, v)| v).collect();
                    all.sort_by_key(|(seq, _)| *seq);
                    return Some(all.into_iter().map(|(_, t)| t).collect());
                }
                if p.closed {
                    return None;
                }
            }
            self.notify.notified().await;
        }
    }

    /// No more changes will come; `take` ends once the rest is taken.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// How many changes replaced an older one not yet taken.
    #[cfg(test)]
    pub(crate) fn coalesced(&self) -> u64 {
        self.lock().coalesced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newest_change_per_vm_in_order_and_bounded_by_vms() {
        let inbox = Inbox::new();
        for i in 0..10_000 {
            inbox.put(format!("vm-{}", i % 3), i);
        }
        let got = inbox.take().await.unwrap();
        assert_eq!(
            got,
            vec![9_997, 9_998, 9_999],
            "one entry per VM, oldest first"
        );
        assert_eq!(inbox.coalesced(), 10_000 - 3);
        inbox.put("vm-0".into(), 1);
        inbox.close();
        assert_eq!(inbox.take().await.unwrap(), vec![1], "the rest after close");
        assert_eq!(inbox.take().await, None);
    }

    #[tokio::test]
    async fn take_waits_for_a_change() {
        let inbox = std::sync::Arc::new(Inbox::new());
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.take().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        inbox.put("a".into(), 7);
        assert_eq!(waiter.await.unwrap(), Some(vec![7]));
    }
}
