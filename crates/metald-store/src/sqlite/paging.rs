//! ListVms paging: keyset pages over `seq`, each with the filter's total
//! (counted once and kept, [`crate::counts`]).

use std::collections::BTreeSet;

use metald_core::ports::StoreError;
use metald_core::{CustomerId, VmState};
use sqlx::{AssertSqlSafe, FromRow};

use super::{SqliteStore, db_err};

impl SqliteStore {
    /// One page of a customer's rows as `R` (the columns `columns`, a
    /// constant of the store's code; `seq` gives a row's position), the cursor
    /// after it and the filter's total.
    pub(super) async fn page<R>(
        &self,
        customer: &CustomerId,
        states: &[VmState],
        cursor: Option<i64>,
        limit: u32,
        columns: &'static str,
        seq: impl Fn(&R) -> i64,
    ) -> Result<(Vec<R>, Option<i64>, i64), StoreError>
    where
        R: for<'r> FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let ctx = || format!("listing vms of customer {:?}", customer.as_str());
        // Duplicates would only lengthen the IN list.
        let states: Vec<&'static str> = states
            .iter()
            .map(|s| s.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (page_sql, count_sql) = list_sql(states.len(), columns);

        // Injection-safe: `page_sql` and `count_sql` hold only constant
        // column lists and generated placeholders (see `list_sql`); every
        // value is bound below.
        let page = || {
            let mut page =
                sqlx::query_as::<_, R>(AssertSqlSafe(page_sql.clone())).bind(customer.as_str());
            for s in &states {
                page = page.bind(*s);
            }
            page.bind(cursor.unwrap_or(i64::MIN))
                .bind(i64::from(limit) + 1)
        };
        let (mut rows, total) = match self.counts.get(customer.as_str(), &states) {
            // The count is kept: the page alone, one statement, no
            // transaction around it (the counts module says how a page and
            // a kept count may be an instant apart).
            Ok(n) if limit > 0 => {
                let rows = page()
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| db_err(ctx(), e))?;
                (rows, n)
            }
            Ok(n) => (Vec::new(), n),
            Err(token) => {
                let mut tx = self.pool.begin().await.map_err(|e| db_err(ctx(), e))?;
                let rows = if limit == 0 {
                    Vec::new()
                } else {
                    page()
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| db_err(ctx(), e))?
                };
                let mut count =
                    sqlx::query_scalar::<_, i64>(AssertSqlSafe(count_sql)).bind(customer.as_str());
                for s in &states {
                    count = count.bind(*s);
                }
                let n = count
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| db_err(ctx(), e))?;
                tx.commit().await.map_err(|e| db_err(ctx(), e))?;
                self.counts.put(customer.as_str(), states.clone(), token, n);
                (rows, n)
            }
        };

        let limit = limit as usize;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(seq)
        } else {
            None
        };
        Ok((rows, next_cursor, total))
    }
}

/// The SQL for one page of a customer's VMs and for the count of all that
/// match, with `state IN (...)` when `n_states > 0`.
///
/// Binds, in order: customer, the `n_states` states, then (page only) the
/// cursor and the row limit. Only placeholders are generated; every value
/// is bound, so the text cannot carry client input.
pub(super) fn list_sql(n_states: usize, columns: &'static str) -> (String, String) {
    let state_filter = if n_states == 0 {
        String::new()
    } else {
        let placeholders: Vec<String> = (2..2 + n_states).map(|i| format!("${i}")).collect();
        format!(" AND state IN ({})", placeholders.join(", "))
    };
    let cursor = n_states + 2;
    let page = format!(
        "SELECT {columns} FROM vms WHERE customer_id = $1{state_filter} AND seq > ${cursor} \
         ORDER BY seq LIMIT ${}",
        cursor + 1
    );
    let count = format!("SELECT COUNT(*) FROM vms WHERE customer_id = $1{state_filter}");
    (page, count)
}

#[cfg(test)]
mod tests {
    use super::list_sql;

    #[test]
    fn list_sql_numbers_placeholders_in_bind_order() {
        let (page, count) = list_sql(0, vm_columns!());
        assert!(
            page.contains("customer_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"),
            "{page}"
        );
        assert!(count.ends_with("WHERE customer_id = $1"), "{count}");
        let (page, count) = list_sql(3, vm_columns!());
        assert!(
            page.contains(
                "customer_id = $1 AND state IN ($2, $3, $4) AND seq > $5 ORDER BY seq LIMIT $6"
            ),
            "{page}"
        );
        assert!(
            count.ends_with("customer_id = $1 AND state IN ($2, $3, $4)"),
            "{count}"
        );
    }
}
