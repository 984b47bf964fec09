//! Runs: a VM's consecutive samples stored as one spool row.
//!
//! The spool's callers still see samples one by one ([`SampleRow`]); this
//! module packs them into runs on the way in and unpacks them on the way
//! out. Acknowledging or parking part of a run splits it: the part in the
//! range is deleted (or stored again, parked), the rest is stored again as
//! it was.

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::{R, SampleRow, e};

/// Bytes per sample in a run's body: eight little-endian `i64`s.
const SAMPLE_BYTES: usize = 64;

/// Runs per multi-row INSERT (6 parameters each, under SQLite's 999).
const RUNS_PER_INSERT: usize = 64;

/// One run as stored.
pub(super) struct Run<'a> {
    pub vm_id: &'a str,
    pub parked: bool,
    pub samples: Vec<&'a SampleRow>,
}

fn encode(samples: &[&SampleRow]) -> Vec<u8> {
    let mut body = Vec::with_capacity(samples.len() * SAMPLE_BYTES);
    for s in samples {
        for v in [
            s.seq,
            s.ts,
            s.cpu_ns,
            s.memory_bytes,
            s.disk_read,
            s.disk_write,
            s.net_rx,
            s.net_tx,
        ] {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    body
}

/// The samples of a run's `body`, or an error naming the run if the body is
/// not whole samples.
pub(super) fn decode(vm_id: &str, first_seq: i64, body: &[u8]) -> R<Vec<SampleRow>> {
    if body.is_empty() || !body.len().is_multiple_of(SAMPLE_BYTES) {
        return Err(format!(
            "billing spool: the run of {vm_id} from sequence {first_seq} is damaged ({} bytes)",
            body.len()
        ));
    }
    let vm_id: std::sync::Arc<str> = vm_id.into();
    Ok(body
        .chunks_exact(SAMPLE_BYTES)
        .map(|c| {
            let v = |i: usize| i64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap());
            SampleRow {
                vm_id: vm_id.clone(),
                seq: v(0),
                ts: v(1),
                cpu_ns: v(2),
                memory_bytes: v(3),
                disk_read: v(4),
                disk_write: v(5),
                net_rx: v(6),
                net_tx: v(7),
            }
        })
        .collect())
}

/// Groups `samples` into one run per VM, each in the order given.
pub(super) fn group(samples: &[SampleRow]) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for s in samples {
        let i = *at.entry(&s.vm_id).or_insert_with(|| {
            runs.push(Run {
                vm_id: &s.vm_id,
                parked: false,
                samples: Vec::new(),
            });
            runs.len() - 1
        });
        runs[i].samples.push(s);
    }
    runs
}

/// Stores `runs` (empty ones skipped). A run whose VM and first sequence
/// are stored already is left as it is, as a sample row was before.
pub(super) async fn insert(db: &mut SqliteConnection, runs: &[Run<'_>]) -> R<()> {
    let runs: Vec<&Run<'_>> = runs.iter().filter(|r| !r.samples.is_empty()).collect();
    for chunk in runs.chunks(RUNS_PER_INSERT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO sample_runs (vm_id, first_seq, last_seq, first_ts, samples, parked, body) ",
        );
        q.push_values(chunk, |mut b, r| {
            let (first, last) = (r.samples[0], r.samples[r.samples.len() - 1]);
            b.push_bind(r.vm_id)
                .push_bind(first.seq)
                .push_bind(last.seq)
                .push_bind(first.ts)
                .push_bind(r.samples.len() as i64)
                .push_bind(r.parked as i64)
                .push_bind(encode(&r.samples));
        });
        q.build()
            .execute(&mut *db)
            .await
            .map_err(e("writing samples"))?;
    }
    Ok(())
}

/// What to do with the samples of a range.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// Delete them (acknowledged), parked or not.
    Delete,
    /// Keep them, parked; parked ones are left alone.
    Park,
}

/// Applies `take` to a VM's samples with `first <= seq <= last`, splitting
/// the runs the range cuts; returns how many samples it took.
pub(super) async fn take(
    db: &mut SqliteConnection,
    vm_id: &str,
    (first, last): (i64, i64),
    take: Take,
) -> R<u64> {
    let rows: Vec<(i64, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT first_seq, last_seq, samples, parked, body FROM sample_runs \
         WHERE vm_id = $1 AND last_seq >= $2 AND first_seq <= $3 AND ($4 = 0 OR parked = 0)",
    )
    .bind(vm_id)
    .bind(first)
    .bind(last)
    .bind((take == Take::Park) as i64)
    .fetch_all(&mut *db)
    .await
    .map_err(e("reading samples"))?;
    let mut taken = 0;
    for (run_first, run_last, n, parked, body) in rows {
        sqlx::query("DELETE FROM sample_runs WHERE vm_id = $1 AND first_seq = $2")
            .bind(vm_id)
            .bind(run_first)
            .execute(&mut *db)
            .await
            .map_err(e("deleting samples"))?;
        if take == Take::Delete && first <= run_first && run_last <= last {
            // Wholly in the range: nothing to store again.
            taken += n as u64;
            continue;
        }
        let samples = decode(vm_id, run_first, &body)?;
        let in_range = |s: &&SampleRow| first <= s.seq && s.seq <= last;
        let inside: Vec<&SampleRow> = samples.iter().filter(in_range).collect();
        let before: Vec<&SampleRow> = samples.iter().filter(|s| s.seq < first).collect();
        let after: Vec<&SampleRow> = samples.iter().filter(|s| s.seq > last).collect();
        taken += inside.len() as u64;
        let was = parked != 0;
        let mut again = vec![
            Run {
                vm_id,
                parked: was,
                samples: before,
            },
            Run {
                vm_id,
                parked: was,
                samples: after,
            },
        ];
        if take == Take::Park {
            again.push(Run {
                vm_id,
                parked: true,
                samples: inside,
            });
        }
        insert(db, &again).await?;
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vm: &str, seq: i64) -> SampleRow {
        SampleRow {
            vm_id: vm.into(),
            seq,
            ts: 1_000 + seq,
            cpu_ns: seq * 7,
            memory_bytes: 4096,
            disk_read: -1,
            disk_write: i64::MAX,
            net_rx: i64::MIN,
            net_tx: 3,
        }
    }

    #[test]
    fn a_run_decodes_to_the_samples_it_was_made_of() {
        let rows: Vec<SampleRow> = (5..9).map(|s| row("vm-a", s)).collect();
        let refs: Vec<&SampleRow> = rows.iter().collect();
        assert_eq!(decode("vm-a", 5, &encode(&refs)).unwrap(), rows);
    }

    #[test]
    fn a_damaged_body_is_an_error_naming_the_run() {
        let err = decode("vm-a", 5, &[0; 65]).unwrap_err();
        assert!(err.contains("vm-a") && err.contains('5'), "{err}");
        assert!(decode("vm-a", 5, &[]).is_err());
    }

    #[test]
    fn samples_group_into_one_run_per_vm_in_their_order() {
        let rows = vec![
            row("a", 1),
            row("b", 1),
            row("a", 2),
            row("b", 2),
            row("a", 3),
        ];
        let runs = group(&rows);
        let seqs: Vec<(&str, Vec<i64>)> = runs
            .iter()
            .map(|r| (r.vm_id, r.samples.iter().map(|s| s.seq).collect()))
            .collect();
        assert_eq!(seqs, vec![("a", vec![1, 2, 3]), ("b", vec![1, 2])]);
    }
}
