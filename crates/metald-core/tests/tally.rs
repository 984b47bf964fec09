//! The sums and rows kept from writes are always the rows': after every
//! write of a long pseudo-random sequence, a tally that has kept up agrees
//! with one that reads every row afresh, and its copy of every row is the
//! row the store holds.

use std::collections::BTreeMap;

use metald_store::SqliteStore;

use std::path::PathBuf;
use std::sync::Arc;

use metald_core::plan::{Plan, PlanRecord};
use metald_core::ports::{Store, StoreError, VmRecord};
use metald_core::tally::{Claims, Tally, Usage};
use metald_core::vm::{DiskInput, VmSpecInput};
use metald_core::{CustomerId, VmId, VmSpec, VmState};

/// A small deterministic generator (xorshift), so a failure replays.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const STATES: [VmState; 5] = [
    VmState::Created,
    VmState::Running,
    VmState::Paused,
    VmState::Shutdown,
    VmState::Failed,
];

fn record(dice: &mut Dice, n: u64) -> VmRecord {
    let disks = (0..dice.roll(3))
        .map(|i| DiskInput {
            id: format!("d{i}"),
            path: format!("/srv/disk-{}.img", dice.roll(4)),
            read_only: dice.roll(2) == 0,
            is_root_device: i == 0,
            ..Default::default()
        })
        .collect();
    let spec = VmSpec::new(VmSpecInput {
        vcpu_count: 1 + dice.roll(4) as i32,
        memory_bytes: ((1 + dice.roll(8)) << 27) as i64,
        kernel_path: "/srv/vmlinux".into(),
        disks,
        ..Default::default()
    })
    .expect("a valid spec");
    let name = VmId::parse(&format!("vm-{n}"), "vm_id").unwrap();
    VmRecord {
        id: VmId::host_key(&name),
        name,
        customer: CustomerId::parse(&format!("c{}", dice.roll(3))).unwrap(),
        spec,
        state: STATES[dice.roll(5) as usize],
        runtime: None,
        last_error: None,
        plan: None,
        created_at: n as i64,
        modified_at: n as i64,
    }
}

type View = (Usage, BTreeMap<PathBuf, Claims>, Usage, Usage);

async fn view(t: &Tally, c: &CustomerId, vm: &VmId, booting: &[VmId]) -> View {
    let (all, disks) = t.customer(c).await.unwrap();
    let r = t.running(c, vm, booting).await.unwrap();
    (all, disks, r.customer, r.host)
}

#[tokio::test]
async fn sums_kept_from_writes_match_sums_read_from_the_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap());
    let kept = Tally::new(store.clone());
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    let mut rows: Vec<VmRecord> = Vec::new();
    for n in 0..400u64 {
        match dice.roll(10) {
            0..=4 => {
                let vm = record(&mut dice, n);
                kept.insert(&vm).await.unwrap();
                rows.push(vm);
            }
            5..=7 if !rows.is_empty() => {
                let i = dice.roll(rows.len() as u64) as usize;
                rows[i].state = STATES[dice.roll(5) as usize];
                kept.update(&rows[i]).await.unwrap();
            }
            8 if !rows.is_empty() && dice.roll(2) == 0 => {
                // Plan progress changes the row's plan record only.
                let i = dice.roll(rows.len() as u64) as usize;
                let plan = match dice.roll(3) {
                    0 => None,
                    n => Some(PlanRecord {
                        plan: Plan::ALL[dice.roll(6) as usize],
                        next: n as usize - 1,
                    }),
                };
                rows[i].plan = plan;
                kept.progress(&rows[i].id, plan).await.unwrap();
            }
            8 if !rows.is_empty() => {
                // The same name again is refused and changes nothing.
                let i = dice.roll(rows.len() as u64) as usize;
                let again = rows[i].clone();
                assert_eq!(kept.insert(&again).await, Err(StoreError::AlreadyExists));
            }
            _ if !rows.is_empty() => {
                let i = dice.roll(rows.len() as u64) as usize;
                let gone = rows.swap_remove(i);
                kept.remove(&gone.id).await.unwrap();
                assert_eq!(kept.get(&gone.id).await.unwrap(), None);
                assert_eq!(kept.find(&gone.customer, &gone.name).await.unwrap(), None);
            }
            _ => {}
        }
        // Every page of every customer, at every other write.
        for c in ["c0", "c1", "c2"].iter().filter(|_| n % 2 == 0) {
            let c = CustomerId::parse(c).unwrap();
            let states = match n % 3 {
                0 => vec![],
                1 => vec![VmState::Running],
                _ => vec![VmState::Created, VmState::Failed],
            };
            let mut cursor = None;
            loop {
                let want = store.list(&c, &states, cursor, 7).await.unwrap();
                let got = kept.list(&c, &states, cursor, 7).await.unwrap();
                assert_eq!(
                    got, want,
                    "after write {n}, customer {c}, states {states:?}"
                );
                cursor = want.next_cursor;
                if cursor.is_none() {
                    break;
                }
            }
        }
        assert_eq!(
            kept.all().await.unwrap(),
            store.all().await.unwrap(),
            "every row in the store's order, after write {n}"
        );
        for row in &rows {
            let stored = store.get(&row.id).await.unwrap();
            assert_eq!(stored.as_ref(), Some(row), "after write {n}");
            assert_eq!(kept.get(&row.id).await.unwrap(), stored, "after write {n}");
            let found = kept.find(&row.customer, &row.name).await.unwrap();
            assert_eq!(found, stored, "after write {n}");
        }
        let afresh = Tally::new(store.clone());
        let booting: Vec<VmId> = rows.iter().step_by(3).map(|r| r.id.clone()).collect();
        for c in ["c0", "c1", "c2"] {
            let c = CustomerId::parse(c).unwrap();
            let vm = rows
                .first()
                .map(|r| r.id.clone())
                .unwrap_or_else(|| VmId::parse("none", "vm_id").unwrap());
            assert_eq!(
                view(&kept, &c, &vm, &booting).await,
                view(&afresh, &c, &vm, &booting).await,
                "after write {n}, customer {c}"
            );
        }
    }
    assert!(rows.len() > 20, "the sequence leaves VMs to count");
}

#[tokio::test]
async fn a_boot_counts_the_booting_and_not_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap());
    let t = Tally::new(store);
    let mut dice = Dice(7);
    let mut vms: Vec<VmRecord> = (0..3).map(|n| record(&mut dice, n)).collect();
    for vm in &mut vms {
        vm.customer = CustomerId::parse("acme").unwrap();
        vm.state = VmState::Created;
        t.insert(vm).await.unwrap();
    }
    let acme = CustomerId::parse("acme").unwrap();
    let ids: Vec<VmId> = vms.iter().map(|v| v.id.clone()).collect();
    // VM 0 asks to boot while 1 and 2 are admitted: 1 and 2 count.
    let r = t.running(&acme, &ids[0], &ids).await.unwrap();
    let want = u64::from(vms[1].spec.vcpus() + vms[2].spec.vcpus());
    assert_eq!((r.customer.running, r.customer.vcpus), (2, want));
    assert_eq!(r.host, r.customer);
    // Once 1 runs by its row, it counts once, booting or not.
    vms[1].state = VmState::Running;
    t.update(&vms[1]).await.unwrap();
    let r = t.running(&acme, &ids[0], &ids).await.unwrap();
    assert_eq!((r.customer.running, r.customer.vcpus), (2, want));
    // Another customer's VMs count for the host only.
    let other = CustomerId::parse("other").unwrap();
    let r = t.running(&other, &ids[0], &ids).await.unwrap();
    assert_eq!((r.customer.running, r.host.running), (0, 2));
}
