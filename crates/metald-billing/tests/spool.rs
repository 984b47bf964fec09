//! The billing spool against a real database file: what a deleted VM
//! leaves is pruned once delivered, and only then; samples stored in runs
//! read, acknowledge and park one by one.

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

fn sample(vm: &str, seq: i64) -> SampleRow {
    SampleRow::new(
        vm,
        seq,
        1_000 + seq,
        Usage {
            cpu_ns: seq * 10,
            memory_bytes: 4096,
            disk_read: seq,
            disk_write: 2 * seq,
            net_rx: 3,
            net_tx: 4,
        },
    )
}

fn seqs(rows: &[SampleRow]) -> Vec<i64> {
    rows.iter().map(|r| r.seq).collect()
}

/// Three writes of `a-1` (seq 0..=9, 10..=19, 20..=29), interleaved with
/// `b-1`'s, as the meter task hands them over.
async fn three_runs(spool: &Spool) {
    for w in 0..3 {
        let mut rows = Vec::new();
        for i in 0..10 {
            rows.push(sample("a-1", w * 10 + i));
            rows.push(sample("b-1", w * 10 + i));
        }
        spool
            .append(&rows, &[meter("a-1", 1), meter("b-1", 1)])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn samples_come_back_whole_in_order_and_acks_and_parks_split_runs() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("billing.db")).await.unwrap();
    three_runs(&spool).await;
    assert_eq!(spool.len().await.unwrap(), 60);

    let got = spool.samples("a-1", i64::MAX, 25).await.unwrap();
    assert_eq!(seqs(&got), (0..25).collect::<Vec<_>>(), "limit cuts a run");
    assert_eq!(got[7], sample("a-1", 7), "every counter survives the run");
    let until = spool.samples("a-1", 1_000 + 12, 100).await.unwrap();
    assert_eq!(
        seqs(&until),
        (0..=12).collect::<Vec<_>>(),
        "`until` cuts a run"
    );

    // Acknowledge 0..=14: the second run is cut; 15.. stay.
    spool.ack("a-1", 0, 14).await.unwrap();
    let left = spool.samples("a-1", i64::MAX, 100).await.unwrap();
    assert_eq!(seqs(&left), (15..30).collect::<Vec<_>>());
    assert_eq!(left[0], sample("a-1", 15));

    // Park 17..=22, across two runs: the rest still flows.
    assert_eq!(spool.park_samples("a-1", 17, 22).await.unwrap(), 6);
    let flowing = spool.samples("a-1", i64::MAX, 100).await.unwrap();
    let want: Vec<i64> = (15..17).chain(23..30).collect();
    assert_eq!(seqs(&flowing), want);
    assert_eq!(
        seqs(&spool.samples_between("a-1", 16, 24).await.unwrap()),
        vec![16, 23, 24],
        "parked samples are not sent again"
    );
    assert_eq!(spool.parked().await.unwrap().0, 6);
    assert_eq!(
        spool.park_samples("a-1", 17, 22).await.unwrap(),
        0,
        "parking twice parks nothing more"
    );
    assert_eq!(
        spool.len().await.unwrap(),
        15 + 30,
        "parked samples take room"
    );

    // b-1 never moved; an ack of everything of a-1 leaves nothing of it,
    // parked samples included.
    assert_eq!(
        seqs(&spool.samples("b-1", i64::MAX, 100).await.unwrap()),
        (0..30).collect::<Vec<_>>()
    );
    spool.ack("a-1", 0, 100).await.unwrap();
    assert_eq!(spool.len().await.unwrap(), 30);
    assert_eq!(spool.parked().await.unwrap().0, 0);
    assert_eq!(spool.oldest_unsent().await.unwrap(), Some(1_000));
}

#[tokio::test]
async fn sample_rows_an_earlier_metald_left_become_runs_when_the_spool_opens() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing.db");
    Spool::open(&path).await.unwrap().close().await;
    {
        // What an earlier metald wrote: one row per sample, some parked.
        let url = format!("sqlite://{}", path.display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        for seq in 0..250 {
            let s = sample("old-1", seq);
            sqlx::query(
                "INSERT INTO samples (vm_id, seq, ts, cpu_ns, memory_bytes, disk_read, disk_write, net_rx, \
                 net_tx, parked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&s.vm_id)
            .bind(s.seq)
            .bind(s.ts)
            .bind(s.cpu_ns)
            .bind(s.memory_bytes)
            .bind(s.disk_read)
            .bind(s.disk_write)
            .bind(s.net_rx)
            .bind(s.net_tx)
            .bind((100..110).contains(&seq) as i64)
            .execute(&mut db)
            .await
            .unwrap();
        }
        db.close().await.unwrap();
    }
    let spool = Spool::open(&path).await.unwrap();
    assert_eq!(spool.len().await.unwrap(), 250);
    assert_eq!(spool.parked().await.unwrap().0, 10);
    let got = spool.samples("old-1", i64::MAX, 1000).await.unwrap();
    let want: Vec<SampleRow> = (0..100)
        .chain(110..250)
        .map(|s| sample("old-1", s))
        .collect();
    assert_eq!(got, want);
    spool.close().await;
    // Opening again moves nothing twice.
    let spool = Spool::open(&path).await.unwrap();
    assert_eq!(spool.len().await.unwrap(), 250);
}
