//! [`SqliteStore`]: VM records in one SQLite file in WAL mode.
//!
//! The SQL here is written to run unchanged on PostgreSQL (`$N`
//! placeholders, standard functions only), so the PostgreSQL store can
//! share it; only the `seq` column's definition in the migration differs.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use metald_core::plan::PlanRecord;
use metald_core::ports::{Store, StoreError, VmPage, VmRecord, VmmRuntime};
use metald_core::vm::VmSpecRow;
use metald_core::{CustomerId, VmId, VmSpec, VmState};
use sqlx::FromRow;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::counts::Counts;

/// The schema, compiled into the binary so a fresh data directory needs
/// nothing but the executable.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Connections in the pool. WAL lets readers proceed while one connection
/// writes; writers still take turns, so more connections would only wait.
const POOL_SIZE: u32 = 4;

/// How long a statement waits for another connection's write lock before
/// failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns every VM query selects, in [`VmRow`]'s order.
macro_rules! vm_columns {
    () => {
        "seq, vm_id, name, customer_id, state, spec_json, runtime_json, last_error, pending_op, created_at, modified_at"
    };
}

mod paging;

/// Durable VM records in a SQLite database file.
///
/// Cloning is cheap and shares the connection pool, so one store can serve
/// the service and background tasks alike.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection with `synchronous=NORMAL`, for plan progress: its
    /// commits reach the disk with the next durable write of the pool.
    progress: SqlitePool,
    /// ListVms totals between writes.
    counts: Arc<Counts>,
}

impl SqliteStore {
    /// Replaces the row's mutable columns through `pool`.
    async fn update_on(&self, pool: &SqlitePool, vm: &VmRecord) -> Result<(), StoreError> {
        let runtime = runtime_json(vm)?;
        let spec = serde_json::to_string(&VmSpecRow::from(&vm.spec)).map_err(|e| {
            StoreError::Other(format!("encoding spec of vm {:?}: {e}", vm.id.as_str()))
        })?;
        let result = sqlx::query(
            "UPDATE vms SET state = $1, runtime_json = $2, last_error = $3, pending_op = $4, \
             modified_at = $5, spec_json = $7 WHERE vm_id = $6",
        )
        .bind(vm.state.as_str())
        .bind(runtime)
        .bind(vm.last_error.as_deref())
        .bind(vm.plan.map(PlanRecord::encode))
        .bind(vm.modified_at)
        .bind(vm.id.as_str())
        .bind(spec)
        .execute(pool)
        .await
        .map_err(|e| db_err(format_args!("updating vm {:?}", vm.id.as_str()), e))?;
        self.counts.invalidate(vm.customer.as_str());
        if result.rows_affected() == 0 {
            return Err(StoreError::Other(format!(
                "updating vm {:?}: no such vm in the store",
                vm.id.as_str()
            )));
        }
        Ok(())
    }
    /// Opens (creating it and its parent directory if missing) the database
    /// at `path` and brings its schema up to date.
    ///
    /// Durability: the journal is a write-ahead log (readers never block the
    /// writer) with `synchronous=FULL`, so every committed write is fsynced
    /// before the call returns. `NORMAL` would be corruption-safe in WAL mode
    /// too, but a power loss could undo the last commits, and the service
    /// tells clients a VM exists, or is gone, right after the write. metald
    /// writes only on lifecycle operations, so an fsync each costs little.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Other(format!(
                    "creating database directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options.clone())
            .await
            .map_err(|e| db_err(format_args!("opening {}", path.display()), e))?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            StoreError::Other(format!("migrating database {}: {e}", path.display()))
        })?;
        let progress = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.synchronous(SqliteSynchronous::Normal))
            .await
            .map_err(|e| db_err(format_args!("opening {}", path.display()), e))?;
        Ok(SqliteStore {
            pool,
            progress,
            counts: Arc::default(),
        })
    }

    /// Writes (and fsyncs) one row: the health check's proof that the
    /// database takes writes. The error says why not.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        sqlx::query(
            "INSERT INTO health_probe (id, checked_at) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map(|_| ())
        .map_err(|e| db_err("writing the health probe", e))
    }

    /// Closes every connection and waits until they are closed. The last one
    /// checkpoints the write-ahead log into the main file, so a clean stop
    /// leaves a single self-contained database file. Later calls on this
    /// store (or its clones) fail.
    pub async fn close(&self) {
        self.progress.close().await;
        self.pool.close().await;
    }
}

/// A stored `spec_json`, judged again ([`VmSpecRow`]).
fn spec_of(json: &str) -> Result<VmSpec, String> {
    let row: VmSpecRow = serde_json::from_str(json).map_err(|e| e.to_string())?;
    VmSpec::try_from(row).map_err(|e| e.to_string())
}

/// A `vms` row as stored, before its text is checked.
#[derive(FromRow)]
struct VmRow {
    seq: i64,
    vm_id: String,
    name: String,
    customer_id: String,
    state: String,
    spec_json: String,
    runtime_json: Option<String>,
    last_error: Option<String>,
    pending_op: Option<String>,
    created_at: i64,
    modified_at: i64,
}

impl VmRow {
    /// Turns a row into a record. A row that does not parse (edited by hand,
    /// written by a newer metald) is an error naming the VM, never a panic.
    fn into_record(self) -> Result<VmRecord, StoreError> {
        let vm_id = &self.vm_id;
        let bad = |what: &str, e: &dyn Display| {
            StoreError::Other(format!(
                "vm {vm_id:?} in the store has an unreadable {what}: {e}"
            ))
        };
        let id = VmId::parse(vm_id, "vm_id").map_err(|e| bad("id", &e))?;
        let name = VmId::parse(&self.name, "name").map_err(|e| bad("name", &e))?;
        let customer = CustomerId::parse(&self.customer_id)
            .map_err(|_| bad("customer id", &format_args!("{:?}", self.customer_id)))?;
        let state = VmState::parse(&self.state)
            .ok_or_else(|| bad("state", &format_args!("{:?}", self.state)))?;
        let spec = spec_of(&self.spec_json).map_err(|e| bad("spec", &e))?;
        let runtime: Option<VmmRuntime> = self
            .runtime_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| bad("runtime", &e))?;
        let plan = self
            .pending_op
            .as_deref()
            .map(|p| PlanRecord::decode(p).ok_or_else(|| bad("plan", &format_args!("{p:?}"))))
            .transpose()?;
        Ok(VmRecord {
            id,
            name,
            customer,
            spec,
            state,
            runtime,
            last_error: self.last_error,
            plan,
            created_at: self.created_at,
            modified_at: self.modified_at,
        })
    }
}

/// Wraps a database error with what the store was doing.
fn db_err(context: impl Display, e: sqlx::Error) -> StoreError {
    StoreError::Other(format!("{context}: {e}"))
}

/// The JSON of a record's runtime, or `None` when no VMM runs.
fn runtime_json(vm: &VmRecord) -> Result<Option<String>, StoreError> {
    vm.runtime
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Other(format!("encoding runtime of vm {:?}: {e}", vm.id.as_str())))
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, vm: &VmRecord) -> Result<i64, StoreError> {
        let spec = serde_json::to_string(&VmSpecRow::from(&vm.spec)).map_err(|e| {
            StoreError::Other(format!("encoding spec of vm {:?}: {e}", vm.id.as_str()))
        })?;
        let runtime = runtime_json(vm)?;
        // RETURNING is in SQLite since 3.35 and in PostgreSQL.
        let result = sqlx::query_scalar::<_, i64>(
            "INSERT INTO vms (vm_id, customer_id, state, spec_json, runtime_json, last_error, \
             pending_op, created_at, modified_at, name) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING seq",
        )
        .bind(vm.id.as_str())
        .bind(vm.customer.as_str())
        .bind(vm.state.as_str())
        .bind(spec)
        .bind(runtime)
        .bind(vm.last_error.as_deref())
        .bind(vm.plan.map(PlanRecord::encode))
        .bind(vm.created_at)
        .bind(vm.modified_at)
        .bind(vm.name.as_str())
        .fetch_one(&self.pool)
        .await;
        self.counts.invalidate(vm.customer.as_str());
        match result {
            Ok(seq) => Ok(seq),
            // (customer_id, name) is the only unique key a caller controls
            // (vm_id is generated by metald, seq by the database), so a
            // unique violation means the customer already uses the name.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::AlreadyExists)
            }
            Err(e) => Err(db_err(format_args!("inserting vm {:?}", vm.id.as_str()), e)),
        }
    }

    async fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        sqlx::query_as::<_, VmRow>(concat!(
            "SELECT ",
            vm_columns!(),
            " FROM vms WHERE vm_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_err(format_args!("loading vm {:?}", id.as_str()), e))?
        .map(VmRow::into_record)
        .transpose()
    }

    async fn find(
        &self,
        customer: &CustomerId,
        name: &VmId,
    ) -> Result<Option<VmRecord>, StoreError> {
        sqlx::query_as::<_, VmRow>(concat!(
            "SELECT ",
            vm_columns!(),
            " FROM vms WHERE customer_id = $1 AND name = $2"
        ))
        .bind(customer.as_str())
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_err(format_args!("loading vm {:?}", name.as_str()), e))?
        .map(VmRow::into_record)
        .transpose()
    }

    /// Replaces state, runtime, last error, plan record and modified time;
    /// the spec,
    /// owner and creation time are fixed at insert. Updating a VM that is
    /// not stored is an error: the service only updates VMs it just loaded
    /// under the VM's lock, so a missing row means a record (possibly a
    /// running VMM's runtime) would silently be lost.
    async fn update(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.update_on(&self.pool, vm).await
    }

    /// The same write on the `synchronous=NORMAL` connection: committed to
    /// the WAL (a metald crash keeps it), fsynced with the next durable
    /// write or checkpoint.
    async fn update_unsynced(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.update_on(&self.progress, vm).await
    }

    async fn progress(&self, id: &VmId, plan: Option<PlanRecord>) -> Result<(), StoreError> {
        sqlx::query("UPDATE vms SET pending_op = $1 WHERE vm_id = $2")
            .bind(plan.map(PlanRecord::encode))
            .bind(id.as_str())
            .execute(&self.progress)
            .await
            .map_err(|e| {
                db_err(
                    format_args!("recording progress of vm {:?}", id.as_str()),
                    e,
                )
            })?;
        Ok(())
    }

    async fn remove(&self, id: &VmId) -> Result<(), StoreError> {
        let owner: Option<String> =
            sqlx::query_scalar("DELETE FROM vms WHERE vm_id = $1 RETURNING customer_id")
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| db_err(format_args!("removing vm {:?}", id.as_str()), e))?;
        if let Some(customer) = owner {
            self.counts.invalidate(&customer);
        }
        Ok(())
    }

    /// Keyset pagination on `seq`: a page is the customer's rows after
    /// `cursor` (from the start when `None`), so VMs created or deleted
    /// between pages never shift later pages. One row beyond `limit` is
    /// fetched to learn whether another page exists. `total` counts every
    /// matching VM regardless of the cursor; it is counted once and kept
    /// until the customer's rows change ([`crate::counts`]), so a page
    /// costs its rows, not a scan of all of them. A `limit` of 0
    /// returns no VMs and no cursor, only the total.
    async fn list(
        &self,
        customer: &CustomerId,
        states: &[VmState],
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<VmPage, StoreError> {
        let (rows, next_cursor, total) = self
            .page::<VmRow>(customer, states, cursor, limit, vm_columns!(), |r| r.seq)
            .await?;
        let vms = rows
            .into_iter()
            .map(VmRow::into_record)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmPage {
            vms,
            next_cursor,
            total,
        })
    }

    async fn positions(&self) -> Result<Vec<(i64, VmId)>, StoreError> {
        sqlx::query_as::<_, (i64, String)>("SELECT seq, vm_id FROM vms ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_err("loading vm positions", e))?
            .into_iter()
            .map(|(seq, id)| Ok((seq, stored_key(&id)?)))
            .collect()
    }

    async fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query_as::<_, VmRow>(concat!("SELECT ", vm_columns!(), " FROM vms ORDER BY seq"))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_err("loading all vms", e))?
            .into_iter()
            .map(VmRow::into_record)
            .collect()
    }

    async fn lease(&self, addr: IpAddr, vm: &VmId) -> Result<bool, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let result =
            sqlx::query("INSERT INTO ip_leases (address, vm_id, leased_at) VALUES ($1, $2, $3)")
                .bind(addr.to_string())
                .bind(vm.as_str())
                .bind(now)
                .execute(&self.pool)
                .await;
        match result {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
            Err(e) => Err(db_err(format_args!("leasing {addr}"), e)),
        }
    }

    async fn leases(&self) -> Result<Vec<(IpAddr, VmId)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT address, vm_id FROM ip_leases")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_err("loading address leases", e))?;
        rows.into_iter()
            .map(|(a, v)| {
                let addr = a
                    .parse()
                    .map_err(|_| StoreError::Other(format!("unreadable leased address {a:?}")))?;
                let vm = VmId::parse(&v, "vm_id")
                    .map_err(|_| StoreError::Other(format!("unreadable lease owner {v:?}")))?;
                Ok((addr, vm))
            })
            .collect()
    }

    async fn release(&self, vm: &VmId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM ip_leases WHERE vm_id = $1")
            .bind(vm.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| db_err(format_args!("releasing addresses of {:?}", vm.as_str()), e))
            .map(drop)
    }
}

/// A VM key read back from the store.
fn stored_key(id: &str) -> Result<VmId, StoreError> {
    VmId::parse(id, "vm_id")
        .map_err(|_| StoreError::Other(format!("vm {id:?} in the store has an unreadable key")))
}
