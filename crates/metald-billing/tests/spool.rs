//! The billing spool against a real database file: what a deleted VM
//! leaves is pruned once delivered, and only then.

use metald_billing::spool::{MeterRow, SampleRow, Spool};
use metald_billing::usage::Usage;

fn meter(vm: &str, running: i64) -> MeterRow {
    MeterRow {
        vm_id: vm.into(),
        vm_name: "web-1".into(),
        customer_id: "acme".into(),
        pid: 1,
        start_time: 1,
        running,
        last_seq: 0,
        last_ts: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_removed_vms_meter_goes_once_its_samples_and_notices_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("billing.db")).await.unwrap();
    let sample = SampleRow::new("gone-1", 0, 10, Usage::default());
    spool
        .append(&[sample], &[meter("gone-1", 0), meter("kept-1", 0)])
        .await
        .unwrap();
    spool
        .push_event("stopped", "gone-1", "web-1", "acme", 11, 0)
        .await
        .unwrap();
    spool.mark_removed("gone-1").await.unwrap();
    assert_eq!(spool.prune().await.unwrap(), 0, "a sample is still unsent");
    spool.ack("gone-1", 0, 0).await.unwrap();
    assert_eq!(spool.prune().await.unwrap(), 0, "a notice is still unsent");
    for ev in spool.events().await.unwrap() {
        spool.delete_event(ev.id).await.unwrap();
    }
    assert_eq!(spool.prune().await.unwrap(), 1);
    let left: Vec<String> = spool
        .meters()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.vm_id)
        .collect();
    assert_eq!(
        left,
        vec!["kept-1".to_owned()],
        "a stopped VM keeps its stream position"
    );
}

#[tokio::test]
async fn past_the_outbox_bound_a_vms_gaps_widen_instead_of_piling_up() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("billing.db"))
        .await
        .unwrap()
        .with_max_outbox(3);
    spool
        .push_event("started", "a-1", "a", "acme", 1, 0)
        .await
        .unwrap();
    for (from, to) in [(10, 20), (30, 40)] {
        spool
            .push_event("gap", "a-1", "a", "acme", from, to)
            .await
            .unwrap();
    }
    // At the bound: more gaps of a-1 widen its latest one.
    for (from, to) in [(50, 60), (70, 80)] {
        spool
            .push_event("gap", "a-1", "a", "acme", from, to)
            .await
            .unwrap();
    }
    // A VM with no waiting gap still gets its own row.
    spool
        .push_event("gap", "b-1", "b", "acme", 5, 6)
        .await
        .unwrap();
    let evs = spool.events().await.unwrap();
    let gaps: Vec<(String, i64, i64)> = evs
        .iter()
        .filter(|e| e.kind == "gap")
        .map(|e| (e.vm_id.clone(), e.t1, e.t2))
        .collect();
    assert_eq!(
        gaps,
        vec![
            ("a-1".to_owned(), 10, 20),
            ("a-1".to_owned(), 30, 80),
            ("b-1".to_owned(), 5, 6)
        ],
        "nothing dropped: the latest gap covers every later one"
    );
}
