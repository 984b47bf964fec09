//! The SQLite store against a real database file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use metald_core::plan::{Plan, PlanRecord};
use metald_core::ports::{Store, StoreError, VmRecord, VmmRuntime};
use metald_core::vm::{DiskInput, VmSpecInput, VmSpecRow};
use metald_core::{CustomerId, VmId, VmSpec, VmState};
use metald_store::SqliteStore;

fn spec() -> VmSpec {
    VmSpec::new(VmSpecInput {
        vcpu_count: 2,
        topology: (1, 2, 1),
        memory_bytes: 256 << 20,
        kernel_path: "/k/vmlinux".into(),
        initrd_path: "/k/initrd".into(),
        kernel_args: "console=ttyS0".into(),
        boot_options: BTreeMap::from([("a".into(), "b".into())]),
        disks: vec![DiskInput {
            id: "root".into(),
            path: "/d/root.ext4".into(),
            read_only: true,
            is_root_device: true,
            interface_type: "virtio-blk".into(),
            options: BTreeMap::from([("cache".into(), "none".into())]),
        }],
        console_enabled: true,
        metadata: BTreeMap::from([("team".into(), "blue".into())]),
        ..Default::default()
    })
    .unwrap()
}

fn record(id: &str, customer: &str) -> VmRecord {
    VmRecord {
        id: VmId::parse(id, "vm_id").unwrap(),
        name: VmId::parse(id, "vm_id").unwrap(),
        customer: CustomerId::parse(customer).unwrap(),
        spec: spec(),
        state: VmState::Created,
        runtime: None,
        last_error: None,
        plan: None,
        created_at: 1_700_000_000,
        modified_at: 1_700_000_000,
    }
}

async fn open() -> (tempfile::TempDir, PathBuf, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metald.db");
    let store = SqliteStore::open(&path).await.unwrap();
    (dir, path, store)
}

#[tokio::test]
async fn records_round_trip_and_ids_are_unique() {
    let (_dir, _path, store) = open().await;
    let mut vm = record("vm-a", "acme");
    let first = store.insert(&vm).await.unwrap();
    assert_eq!(store.get(&vm.id).await.unwrap(), Some(vm.clone()));
    assert_eq!(
        store
            .get(&VmId::parse("missing", "t").unwrap())
            .await
            .unwrap(),
        None
    );

    let mut dup = record("vm-a", "other");
    dup.state = VmState::Failed;
    assert_eq!(store.insert(&dup).await, Err(StoreError::AlreadyExists));
    assert_eq!(
        store.get(&vm.id).await.unwrap(),
        Some(vm.clone()),
        "the first row is untouched"
    );

    vm.state = VmState::Running;
    vm.runtime = Some(VmmRuntime {
        backend: "qemu".into(),
        pid: 42,
        start_time: 99,
        socket: "/s/qmp.sock".into(),
    });
    vm.last_error = Some("earlier failure".into());
    vm.plan = Some(PlanRecord::start(Plan::Shutdown));
    vm.modified_at += 5;
    store.update(&vm).await.unwrap();
    assert_eq!(store.get(&vm.id).await.unwrap(), Some(vm.clone()));

    // Progress touches the plan record only.
    let on = Some(PlanRecord {
        plan: Plan::Delete,
        next: 3,
    });
    store.progress(&vm.id, on).await.unwrap();
    vm.plan = on;
    assert_eq!(store.get(&vm.id).await.unwrap(), Some(vm.clone()));

    // Positions follow insertion order, are what the cursor pages by, and
    // are never handed out again.
    let second = store.insert(&record("vm-b", "acme")).await.unwrap();
    assert!(second > first, "{second} after {first}");
    let b = VmId::parse("vm-b", "t").unwrap();
    assert_eq!(
        store.positions().await.unwrap(),
        vec![(first, vm.id.clone()), (second, b.clone())]
    );
    let acme = CustomerId::parse("acme").unwrap();
    let after_a = store.list(&acme, &[], Some(first), 10).await.unwrap();
    assert_eq!(after_a.vms.iter().map(|v| &v.id).collect::<Vec<_>>(), [&b]);
    store.remove(&b).await.unwrap();
    let third = store.insert(&record("vm-c", "acme")).await.unwrap();
    assert!(third > second, "{third} after the removed {second}");
    store
        .remove(&VmId::parse("vm-c", "t").unwrap())
        .await
        .unwrap();

    store.remove(&vm.id).await.unwrap();
    assert_eq!(store.get(&vm.id).await.unwrap(), None);
    store
        .remove(&vm.id)
        .await
        .expect("removing a missing row is not an error");
    assert!(
        store.update(&vm).await.is_err(),
        "updating a missing row must not pass silently"
    );
}

#[tokio::test]
async fn names_are_unique_per_customer_only() {
    let (_dir, _path, store) = open().await;
    let name = VmId::parse("web-1", "t").unwrap();
    let mut a = record("web-1-aaaa", "a");
    a.name = name.clone();
    let mut b = record("web-1-bbbb", "b");
    b.name = name.clone();
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    let (ca, cb) = (a.customer.clone(), b.customer.clone());
    assert_eq!(store.find(&ca, &name).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find(&cb, &name).await.unwrap(), Some(b.clone()));
    let nobody = CustomerId::parse("c").unwrap();
    assert_eq!(store.find(&nobody, &name).await.unwrap(), None);
    // The same customer cannot have the name twice.
    let mut again = record("web-1-cccc", "a");
    again.name = name.clone();
    assert_eq!(store.insert(&again).await, Err(StoreError::AlreadyExists));
}

#[tokio::test]
async fn rows_from_before_per_customer_names_keep_their_id_as_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metald.db");
    {
        // The schema as the first three migrations left it, with one row.
        let mut old = sqlx::migrate!("./migrations");
        old.migrations = std::borrow::Cow::Owned(old.migrations[..3].to_vec());
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        old.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO vms (vm_id, customer_id, state, spec_json, created_at, modified_at) \
             VALUES ('old-vm', 'acme', 'created', $1, 1, 1)",
        )
        .bind(serde_json::to_string(&VmSpecRow::from(&spec())).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let id = VmId::parse("old-vm", "t").unwrap();
    let acme = CustomerId::parse("acme").unwrap();
    let vm = store
        .find(&acme, &id)
        .await
        .unwrap()
        .expect("found by name");
    assert_eq!((vm.id.as_str(), vm.name.as_str()), ("old-vm", "old-vm"));
}

#[tokio::test]
async fn listing_pages_by_customer_and_state_without_gaps() {
    let (_dir, _path, store) = open().await;
    let acme = CustomerId::parse("acme").unwrap();
    for i in 0..120 {
        let mut vm = record(&format!("a-{i:03}"), "acme");
        if i % 3 == 0 {
            vm.state = VmState::Shutdown;
        }
        store.insert(&vm).await.unwrap();
        store
            .insert(&record(&format!("b-{i:03}"), "globex"))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = Vec::new();
    loop {
        let page = store.list(&acme, &[], cursor, 50).await.unwrap();
        // Deleting a VM already listed must not shift the next page (an
        // offset-based listing would skip a VM here).
        assert_eq!(page.total, if pages.is_empty() { 120 } else { 119 });
        if pages.is_empty() {
            store
                .remove(&VmId::parse("a-010", "t").unwrap())
                .await
                .unwrap();
        }
        pages.push(page.vms.len());
        seen.extend(page.vms.iter().map(|v| v.id.to_string()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, [50, 50, 20]);
    let expected: Vec<String> = (0..120).map(|i| format!("a-{i:03}")).collect();
    assert_eq!(
        seen, expected,
        "only acme's VMs, in creation order, no gaps or duplicates"
    );

    let shut = store
        .list(&acme, &[VmState::Shutdown, VmState::Shutdown], None, 1000)
        .await
        .unwrap();
    assert_eq!(shut.total, 40);
    assert!(shut.vms.iter().all(|v| v.state == VmState::Shutdown));
    let both = store
        .list(&acme, &[VmState::Shutdown, VmState::Created], None, 1000)
        .await
        .unwrap();
    assert_eq!(both.total, 119, "a-010 was deleted");
    let none = store
        .list(&acme, &[VmState::Running], None, 10)
        .await
        .unwrap();
    assert_eq!((none.vms.len(), none.total, none.next_cursor), (0, 0, None));
}

#[tokio::test]
async fn wal_mode_and_rows_survive_reopening() {
    let (_dir, path, store) = open().await;
    store.insert(&record("vm-keep", "acme")).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&sqlx_pool(&path).await)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    store.close().await;
    let again = SqliteStore::open(&path)
        .await
        .expect("reopening runs migrations idempotently");
    assert!(
        again
            .get(&VmId::parse("vm-keep", "t").unwrap())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(again.all().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_unreadable_row_is_an_error_naming_the_vm() {
    let (_dir, path, store) = open().await;
    store.insert(&record("vm-bad", "acme")).await.unwrap();
    sqlx::query("UPDATE vms SET spec_json = 'garbage' WHERE vm_id = 'vm-bad'")
        .execute(&sqlx_pool(&path).await)
        .await
        .unwrap();
    let err = store
        .get(&VmId::parse("vm-bad", "t").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vm-bad"), "{err}");
}

async fn sqlx_pool(path: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_address_is_leased_once_even_under_concurrent_callers() {
    let (_dir, _path, store) = open().await;
    let addr: std::net::IpAddr = "10.100.0.2".parse().unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .lease(addr, &VmId::parse(&format!("vm-{i}"), "t").unwrap())
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as usize;
    }
    assert_eq!(winners, 1, "exactly one VM gets the address");
    let leases = store.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    store.release(&leases[0].1).await.unwrap();
    assert!(store.leases().await.unwrap().is_empty());
    assert!(
        store
            .lease(addr, &VmId::parse("vm-late", "t").unwrap())
            .await
            .unwrap(),
        "released addresses are reusable"
    );
}

#[tokio::test]
async fn list_totals_kept_between_pages_follow_every_write() {
    let (_dir, _path, store) = open().await;
    let acme = CustomerId::parse("acme").unwrap();
    let total = |states: &'static [VmState]| {
        let store = store.clone();
        let acme = acme.clone();
        async move { store.list(&acme, states, None, 1).await.unwrap().total }
    };
    for i in 0..3 {
        store
            .insert(&record(&format!("t-{i}"), "acme"))
            .await
            .unwrap();
    }
    // Read twice: the second read is served from what the first counted.
    assert_eq!((total(&[]).await, total(&[]).await), (3, 3));
    assert_eq!(total(&[VmState::Running]).await, 0);

    store.insert(&record("t-3", "acme")).await.unwrap();
    assert_eq!(total(&[]).await, 4, "an insert counts");
    assert!(store.insert(&record("t-3", "acme")).await.is_err());
    assert_eq!(total(&[]).await, 4, "a refused insert does not");
    assert_eq!(total(&[VmState::Running]).await, 0);
    assert_eq!(total(&[VmState::Created]).await, 4);

    let mut vm = store
        .find(&acme, &VmId::parse("t-1", "t").unwrap())
        .await
        .unwrap()
        .unwrap();
    vm.state = VmState::Running;
    store.update(&vm).await.unwrap();
    assert_eq!(total(&[VmState::Running]).await, 1, "a state change counts");
    assert_eq!(total(&[VmState::Created]).await, 3);

    store.remove(&vm.id).await.unwrap();
    assert_eq!(total(&[]).await, 3, "a delete counts");
    assert_eq!(total(&[VmState::Running]).await, 0);

    store.insert(&record("g-0", "globex")).await.unwrap();
    assert_eq!(total(&[]).await, 3, "another customer's VM does not");
}
