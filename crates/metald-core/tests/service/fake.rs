//! The fake VMM of the service layer's tests: processes are pids in a set,
//! exits go to watchers through a channel, and gates let a test hold an
//! operation inside the VMM.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use metald_core::ports::{
    GuestStatus, HostResources, StopMode, Vmm, VmmError, VmmExit, VmmRuntime,
};
use metald_core::{VmId, VmSpec};
use tokio::sync::{Notify, watch};

#[derive(Default)]
pub struct Fake {
    pub alive: HashSet<i32>,
    pub exits: HashMap<i32, watch::Sender<Option<VmmExit>>>,
    pub destroyed: Vec<String>,
    pub killed: Vec<i32>,
    pub scan: HostResources,
    /// Destroys do not tell the exit watcher (no watcher still runs when a
    /// test counts the service's locks).
    pub quiet: bool,
    /// Destroys of VMs whose key starts with one of these fail (files that
    /// cannot be removed yet, a VMM that survives SIGKILL for a while).
    pub fail_destroy: Vec<String>,
    /// Processes each VM's boots started, as a real backend records its
    /// spawns in the VM's directory: destroy kills them even when the row
    /// lost its runtime.
    pub spawned: HashMap<String, Vec<i32>>,
    /// What the VMM of a pid says about its guest; unset: "unknown".
    pub status: HashMap<i32, GuestStatus>,
    /// How the VMM of a pid fails a pause, resume or reboot; unset: it
    /// succeeds.
    pub call_fails: HashMap<i32, VmmError>,
}

#[derive(Default)]
pub struct FakeVmm {
    pub s: Mutex<Fake>,
    pub next_pid: AtomicI32,
    /// Boots of the VM named "slow", and deletes of a running VM named
    /// "stuck", wait for this.
    pub gate: Notify,
    /// Told when a delete of "stuck" is inside the VMM.
    pub entered: Notify,
}

impl FakeVmm {
    pub fn st(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.s.lock().unwrap()
    }
    pub fn spawn(&self) -> i32 {
        let pid = 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
        let mut s = self.st();
        s.alive.insert(pid);
        s.exits.insert(pid, watch::channel(None).0);
        pid
    }
    /// The process dies; `exit` is what its watcher will learn (None: the
    /// watcher never hears of it).
    pub fn die(&self, pid: i32, exit: Option<VmmExit>) {
        let mut s = self.st();
        s.alive.remove(&pid);
        if let (Some(e), Some(tx)) = (exit, s.exits.get(&pid)) {
            let _ = tx.send(Some(e));
        }
    }
    pub fn rt(pid: i32) -> VmmRuntime {
        VmmRuntime {
            backend: "fake".into(),
            pid,
            start_time: 1,
            socket: format!("/fake/{pid}").into(),
        }
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn boot(&self, id: &VmId, _spec: &VmSpec) -> Result<VmmRuntime, VmmError> {
        if id.as_str().starts_with("slow-") {
            self.gate.notified().await;
        }
        if id.as_str().starts_with("refused-") {
            return Err(VmmError::Refused("the VMM refused the config".into()));
        }
        let pid = self.spawn();
        self.st()
            .spawned
            .entry(id.to_string())
            .or_default()
            .push(pid);
        Ok(Self::rt(pid))
    }
    async fn pause(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.st()
            .call_fails
            .get(&rt.pid)
            .cloned()
            .map_or(Ok(()), Err)
    }
    async fn resume(&self, rt: &VmmRuntime) -> Result<(), VmmError> {
        self.st()
            .call_fails
            .get(&rt.pid)
            .cloned()
            .map_or(Ok(()), Err)
    }
    async fn reboot(
        &self,
        _id: &VmId,
        _spec: &VmSpec,
        rt: &VmmRuntime,
    ) -> Result<VmmRuntime, VmmError> {
        let fails = self.st().call_fails.get(&rt.pid).cloned();
        match fails {
            // A VMM gone mid-reset: its process ends with the call.
            Some(e) if e.is_gone() => {
                let killed = VmmExit {
                    code: None,
                    signal: Some(9),
                };
                self.die(rt.pid, Some(killed));
                Err(e)
            }
            Some(e) => Err(e),
            None => Ok(rt.clone()),
        }
    }
    async fn shutdown(&self, rt: &VmmRuntime, _mode: StopMode) -> Result<(), VmmError> {
        self.die(
            rt.pid,
            Some(VmmExit {
                code: Some(0),
                signal: None,
            }),
        );
        Ok(())
    }
    async fn destroy(&self, id: &VmId, rt: Option<&VmmRuntime>) -> Result<(), VmmError> {
        if self
            .st()
            .fail_destroy
            .iter()
            .any(|p| id.as_str().starts_with(p.as_str()))
        {
            return Err(VmmError::Io("cannot remove the VM's files yet".into()));
        }
        if rt.is_some() && id.as_str().starts_with("stuck-") {
            self.entered.notify_one();
            self.gate.notified().await;
        }
        let recorded = self.st().spawned.remove(id.as_str()).unwrap_or_default();
        let quiet = self.st().quiet;
        for pid in rt.map(|r| r.pid).into_iter().chain(recorded) {
            let killed = VmmExit {
                code: None,
                signal: Some(9),
            };
            self.die(pid, (!quiet).then_some(killed));
        }
        self.st().destroyed.push(id.to_string());
        Ok(())
    }
    async fn adopt(&self, _id: &VmId, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        if self.st().alive.contains(&rt.pid) {
            Ok(GuestStatus::Running)
        } else {
            Err(VmmError::Gone("no such process".into()))
        }
    }
    fn wait_exit(&self, rt: &VmmRuntime) -> BoxFuture<'static, VmmExit> {
        let rx = self.st().exits.get(&rt.pid).map(|tx| tx.subscribe());
        async move {
            match rx {
                Some(mut rx) => rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|e| e.clone()),
                None => None,
            }
            .unwrap_or(VmmExit {
                code: None,
                signal: None,
            })
        }
        .boxed()
    }
    async fn status(&self, rt: &VmmRuntime) -> Result<GuestStatus, VmmError> {
        let s = self.st();
        match s.status.get(&rt.pid) {
            Some(st) if s.alive.contains(&rt.pid) => Ok(*st),
            _ => Err(VmmError::Timeout("no answer".into())),
        }
    }
    fn is_alive(&self, rt: &VmmRuntime) -> bool {
        self.st().alive.contains(&rt.pid)
    }
    async fn release(&self, _id: &VmId, _rt: &VmmRuntime) {}
    async fn scan(&self) -> HostResources {
        self.st().scan.clone()
    }
    async fn kill_orphan(&self, pid: i32, _start_time: u64) -> Result<(), VmmError> {
        self.st().killed.push(pid);
        Ok(())
    }
    async fn describe(&self, _id: &VmId, _rt: Option<&VmmRuntime>) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}
