//! The durable spool (`billing.db`, SQLite in WAL mode): samples and
//! notifications are written here before anything is sent, and deleted
//! only once the billing service acknowledged them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{FromRow, QueryBuilder, Row, Sqlite};

use crate::usage::Usage;

mod runs;

use runs::Take;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// One sample as spooled (stored with the VM's other samples of the same
/// write, as a run: see `runs`).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct SampleRow {
    /// Shared by every sample of the VM (a clone is a count, not a copy).
    #[sqlx(try_from = "String")]
    pub vm_id: Arc<str>,
    pub seq: i64,
    /// Unix nanoseconds.
    pub ts: i64,
    pub cpu_ns: i64,
    pub memory_bytes: i64,
    pub disk_read: i64,
    pub disk_write: i64,
    pub net_rx: i64,
    pub net_tx: i64,
}

impl SampleRow {
    pub fn new(vm_id: impl Into<Arc<str>>, seq: i64, ts: i64, u: Usage) -> Self {
        SampleRow {
            vm_id: vm_id.into(),
            seq,
            ts,
            cpu_ns: u.cpu_ns,
            memory_bytes: u.memory_bytes,
            disk_read: u.disk_read,
            disk_write: u.disk_write,
            net_rx: u.net_rx,
            net_tx: u.net_tx,
        }
    }
}

/// Rows per multi-row INSERT: 14 columns × 64 rows stays under SQLite's
/// bound of parameters per statement on every version (999 before 3.32).
const ROWS_PER_INSERT: usize = 64;

/// Most samples in one run made from an earlier metald's sample rows.
const LEGACY_RUN: usize = 100;

/// Notices waiting beyond which a VM's new gap widens its latest waiting
/// gap instead of adding a row.
pub const MAX_OUTBOX: i64 = 100_000;

/// Where a VM's sample stream stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromRow)]
pub struct MeterRow {
    /// metald's host-wide key of the VM.
    pub vm_id: String,
    /// The customer's name for the VM ('' in rows from before names were
    /// per customer: then `vm_id` is the name).
    pub vm_name: String,
    pub customer_id: String,
    pub pid: i64,
    pub start_time: i64,
    pub running: i64,
    pub last_seq: i64,
    pub last_ts: i64,
    /// CPU time and disk bytes the VM reached before its current (when
    /// running) or next (when stopped) VMM process.
    pub carried_cpu_ns: i64,
    pub carried_disk_read: i64,
    pub carried_disk_write: i64,
    /// The counters of the VM's last sample: what a VMM that died while
    /// metald was down leaves its successor to carry.
    pub total_cpu_ns: i64,
    pub total_disk_read: i64,
    pub total_disk_write: i64,
}

/// A notification waiting for acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct EventRow {
    pub id: i64,
    /// `started` (t1 = start), `stopped` (t1 = stop), `gap` (t1 = last
    /// sample before the gap, t2 = first after).
    pub kind: String,
    pub vm_id: String,
    pub vm_name: String,
    pub customer_id: String,
    pub t1: i64,
    pub t2: i64,
}

/// The spool database.
#[derive(Clone)]
pub struct Spool {
    pool: SqlitePool,
    max_outbox: i64,
}

pub(crate) type R<T> = Result<T, String>;

pub(crate) fn e(ctx: &str) -> impl Fn(sqlx::Error) -> String + '_ {
    move |err| format!("billing spool: {ctx}: {err}")
}

impl Spool {
    /// Opens (creating) the spool at `path`.
    pub async fn open(path: &Path) -> R<Spool> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|err| format!("opening {}: {err}", path.display()))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|err| format!("migrating {}: {err}", path.display()))?;
        let spool = Spool {
            pool,
            max_outbox: MAX_OUTBOX,
        };
        spool.runs_from_rows().await?;
        Ok(spool)
    }

    /// Moves the sample rows an earlier metald left (one row per sample)
    /// into runs, a VM at a time, each VM in one transaction.
    async fn runs_from_rows(&self) -> R<()> {
        let vms: Vec<String> = sqlx::query_scalar("SELECT DISTINCT vm_id FROM samples")
            .fetch_all(&self.pool)
            .await
            .map_err(e("listing earlier sample rows"))?;
        for vm in vms {
            let mut tx = self.pool.begin().await.map_err(e("begin"))?;
            let rows: Vec<(i64, SampleRow)> = sqlx::query(
                "SELECT parked, vm_id, seq, ts, cpu_ns, memory_bytes, disk_read, disk_write, net_rx, net_tx \
                 FROM samples WHERE vm_id = $1 ORDER BY seq",
            )
            .bind(&vm)
            .fetch_all(&mut *tx)
            .await
            .map_err(e("reading earlier sample rows"))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, SampleRow::from_row(r)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(e("reading earlier sample rows"))?;
            let mut made: Vec<runs::Run<'_>> = Vec::new();
            for (parked, s) in &rows {
                let parked = *parked != 0;
                match made.last_mut() {
                    Some(r) if r.parked == parked && r.samples.len() < LEGACY_RUN => {
                        r.samples.push(s)
                    }
                    _ => made.push(runs::Run {
                        vm_id: &s.vm_id,
                        parked,
                        samples: vec![s],
                    }),
                }
            }
            runs::insert(&mut tx, &made).await?;
            sqlx::query("DELETE FROM samples WHERE vm_id = $1")
                .bind(&vm)
                .execute(&mut *tx)
                .await
                .map_err(e("deleting earlier sample rows"))?;
            tx.commit().await.map_err(e("commit"))?;
        }
        Ok(())
    }

    /// The same spool with another outbox bound (for tests).
    pub fn with_max_outbox(mut self, n: i64) -> Self {
        self.max_outbox = n;
        self
    }

    /// Writes samples and meter positions in one transaction (one fsync).
    /// A VM's samples of one write are one row (a run), and rows go
    /// [`ROWS_PER_INSERT`] to a statement: each statement is a trip to
    /// sqlx's SQLite thread, and each row an index entry; one row per
    /// sample was most of the spool's CPU time with a thousand VMs sampled
    /// every 100 ms.
    pub async fn append(&self, samples: &[SampleRow], meters: &[MeterRow]) -> R<()> {
        let mut tx = self.pool.begin().await.map_err(e("begin"))?;
        runs::insert(&mut tx, &runs::group(samples)).await?;
        for chunk in meters.chunks(ROWS_PER_INSERT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO meters (vm_id, customer_id, pid, start_time, running, last_seq, last_ts, vm_name, \
                 carried_cpu_ns, carried_disk_read, carried_disk_write, total_cpu_ns, total_disk_read, total_disk_write) ",
            );
            q.push_values(chunk, |mut b, m| {
                b.push_bind(&m.vm_id)
                    .push_bind(&m.customer_id)
                    .push_bind(m.pid)
                    .push_bind(m.start_time)
                    .push_bind(m.running)
                    .push_bind(m.last_seq)
                    .push_bind(m.last_ts)
                    .push_bind(&m.vm_name)
                    .push_bind(m.carried_cpu_ns)
                    .push_bind(m.carried_disk_read)
                    .push_bind(m.carried_disk_write)
                    .push_bind(m.total_cpu_ns)
                    .push_bind(m.total_disk_read)
                    .push_bind(m.total_disk_write);
            });
            q.push(
                " ON CONFLICT (vm_id) DO UPDATE SET \
                 customer_id = excluded.customer_id, vm_name = excluded.vm_name, pid = excluded.pid, start_time = excluded.start_time, \
                 running = excluded.running, last_seq = excluded.last_seq, last_ts = excluded.last_ts, \
                 carried_cpu_ns = excluded.carried_cpu_ns, carried_disk_read = excluded.carried_disk_read, \
                 carried_disk_write = excluded.carried_disk_write, total_cpu_ns = excluded.total_cpu_ns, \
                 total_disk_read = excluded.total_disk_read, total_disk_write = excluded.total_disk_write",
            );
            q.build()
                .execute(&mut *tx)
                .await
                .map_err(e("writing meters"))?;
        }
        tx.commit().await.map_err(e("commit"))
    }

    /// Every meter, as the last run left them.
    pub async fn meters(&self) -> R<Vec<MeterRow>> {
        sqlx::query_as(
            "SELECT vm_id, vm_name, customer_id, pid, start_time, running, last_seq, last_ts, \
             carried_cpu_ns, carried_disk_read, carried_disk_write, total_cpu_ns, total_disk_read, total_disk_write \
             FROM meters",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e("reading meters"))
    }

    /// Queues a notification (durably, at once). While the billing service
    /// is away, notices pile up; past [`MAX_OUTBOX`] notices a gap is merged into the
    /// VM's latest waiting gap (one wider gap, nothing dropped), so the
    /// outbox stays bounded by the VMs rather than by the outage's length.
    pub async fn push_event(
        &self,
        kind: &str,
        vm_id: &str,
        vm_name: &str,
        customer_id: &str,
        t1: i64,
        t2: i64,
    ) -> R<()> {
        if kind == "gap" {
            let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
                .fetch_one(&self.pool)
                .await
                .map_err(e("counting notifications"))?;
            if waiting >= self.max_outbox {
                let merged = sqlx::query(
                    "UPDATE outbox SET t1 = MIN(t1, $2), t2 = MAX(t2, $3) WHERE id = \
                     (SELECT MAX(id) FROM outbox WHERE kind = 'gap' AND vm_id = $1 AND parked = 0)",
                )
                .bind(vm_id)
                .bind(t1)
                .bind(t2)
                .execute(&self.pool)
                .await
                .map_err(e("merging a gap"))?;
                if merged.rows_affected() > 0 {
                    return Ok(());
                }
            }
        }
        sqlx::query(
            "INSERT INTO outbox (kind, vm_id, vm_name, customer_id, t1, t2) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(kind)
        .bind(vm_id)
        .bind(vm_name)
        .bind(customer_id)
        .bind(t1)
        .bind(t2)
        .execute(&self.pool)
        .await
        .map_err(e("queueing a notification"))
        .map(drop)
    }

    /// Notifications waiting (not parked), oldest first.
    pub async fn events(&self) -> R<Vec<EventRow>> {
        sqlx::query_as(
            "SELECT id, kind, vm_id, vm_name, customer_id, t1, t2 FROM outbox WHERE parked = 0 ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e("reading notifications"))
    }

    pub async fn delete_event(&self, id: i64) -> R<()> {
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(e("deleting a notification"))
            .map(drop)
    }

    /// VMs with unsent samples: key, name and customer.
    pub async fn vms_with_samples(&self) -> R<Vec<(String, String, String)>> {
        let rows = sqlx::query(
            "SELECT DISTINCT s.vm_id, m.vm_name, m.customer_id FROM sample_runs s JOIN meters m ON m.vm_id = s.vm_id \
             WHERE s.parked = 0 ORDER BY s.vm_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(e("listing VMs with samples"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<String, _>(1),
                    r.get::<String, _>(2),
                )
            })
            .collect())
    }

    /// The oldest unsent samples of a VM, at most `limit`, taken no later
    /// than `until` (Unix ns): consecutive, up to the first taken later.
    pub async fn samples(&self, vm_id: &str, until: i64, limit: i64) -> R<Vec<SampleRow>> {
        // Every run holds at least one sample: `limit` runs are enough.
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT first_seq, body FROM sample_runs WHERE vm_id = $1 AND first_ts <= $2 AND parked = 0 \
             ORDER BY first_seq LIMIT $3",
        )
        .bind(vm_id)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(e("reading samples"))?;
        let mut out = Vec::new();
        for (first, body) in rows {
            for s in runs::decode(vm_id, first, &body)? {
                if s.ts > until || out.len() as i64 >= limit {
                    return Ok(out);
                }
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The unsent samples of a VM with `first <= seq <= last`.
    pub async fn samples_between(&self, vm_id: &str, first: i64, last: i64) -> R<Vec<SampleRow>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT first_seq, body FROM sample_runs \
             WHERE vm_id = $1 AND last_seq >= $2 AND first_seq <= $3 AND parked = 0 ORDER BY first_seq",
        )
        .bind(vm_id)
        .bind(first)
        .bind(last)
        .fetch_all(&self.pool)
        .await
        .map_err(e("reading samples"))?;
        let mut out = Vec::new();
        for (run_first, body) in rows {
            out.extend(
                runs::decode(vm_id, run_first, &body)?
                    .into_iter()
                    .filter(|s| first <= s.seq && s.seq <= last),
            );
        }
        Ok(out)
    }

    /// Drops acknowledged samples.
    pub async fn ack(&self, vm_id: &str, first: i64, last: i64) -> R<()> {
        let mut tx = self.pool.begin().await.map_err(e("begin"))?;
        runs::take(&mut tx, vm_id, (first, last), Take::Delete).await?;
        tx.commit()
            .await
            .map_err(e("deleting acknowledged samples"))
    }

    /// Keeps a VM's samples `first..=last` on disk but sends them no more
    /// (the billing service refused them for good); returns how many.
    pub async fn park_samples(&self, vm_id: &str, first: i64, last: i64) -> R<u64> {
        let mut tx = self.pool.begin().await.map_err(e("begin"))?;
        let n = runs::take(&mut tx, vm_id, (first, last), Take::Park).await?;
        tx.commit().await.map_err(e("parking samples"))?;
        Ok(n)
    }

    /// Keeps a notice on disk but sends it no more.
    pub async fn park_event(&self, id: i64) -> R<()> {
        sqlx::query("UPDATE outbox SET parked = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(e("parking a notification"))
            .map(drop)
    }

    /// When the oldest unsent, unparked sample was taken (Unix ns).
    pub async fn oldest_unsent(&self) -> R<Option<i64>> {
        sqlx::query_scalar("SELECT MIN(first_ts) FROM sample_runs WHERE parked = 0")
            .fetch_one(&self.pool)
            .await
            .map_err(e("finding the oldest unsent sample"))
    }

    /// Parked rows: (samples, notices).
    pub async fn parked(&self) -> R<(i64, i64)> {
        let samples = sqlx::query_scalar(
            "SELECT COALESCE(SUM(samples), 0) FROM sample_runs WHERE parked = 1",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(e("counting parked samples"))?;
        let notices = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE parked = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(e("counting parked notifications"))?;
        Ok((samples, notices))
    }

    /// Closes the database (checkpointing the write-ahead log).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Marks a VM whose row is gone from metald.db.
    pub async fn mark_removed(&self, vm_id: &str) -> R<()> {
        sqlx::query("UPDATE meters SET removed = 1 WHERE vm_id = $1")
            .bind(vm_id)
            .execute(&self.pool)
            .await
            .map_err(e("marking a removed VM"))
            .map(drop)
    }

    /// Drops the meter rows of removed VMs with nothing left to deliver
    /// (parked rows stay, without their meter);
    /// returns how many.
    pub async fn prune(&self) -> R<u64> {
        sqlx::query(
            "DELETE FROM meters WHERE removed = 1 \
             AND NOT EXISTS (SELECT 1 FROM sample_runs s WHERE s.vm_id = meters.vm_id AND s.parked = 0) \
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.vm_id = meters.vm_id AND o.parked = 0)",
        )
        .execute(&self.pool)
        .await
        .map_err(e("pruning meters of removed VMs"))
        .map(|r| r.rows_affected())
    }

    /// How many samples the spool holds (parked ones included: they take
    /// room on disk too).
    pub async fn len(&self) -> R<i64> {
        sqlx::query_scalar("SELECT COALESCE(SUM(samples), 0) FROM sample_runs")
            .fetch_one(&self.pool)
            .await
            .map_err(e("counting samples"))
    }
}
