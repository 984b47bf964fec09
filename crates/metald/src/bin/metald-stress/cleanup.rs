//! Leaving nothing behind: the first SIGINT or SIGTERM stops new calls (calls
//! in flight finish), the run then deletes every VM it made and exits
//! non-zero; a second signal exits at once, naming what is left.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::run::Ctx;

/// Watches for SIGINT and SIGTERM; the first sets `stop`.
pub fn on_signals(stop: watch::Sender<bool>) -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let mut first = true;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if first {
                first = false;
                eprintln!(
                    "metald-stress: interrupted; deleting the VMs this run made (again to quit now)"
                );
                let _ = stop.send(true);
            } else {
                eprintln!("metald-stress: interrupted twice; VMs of this run may be left");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// Deletes every VM the run made or may have made, then lists every
/// customer's VMs; the names of this run still there.
pub async fn delete_all(ctx: &Arc<Ctx>) -> Vec<String> {
    for _ in 0..3 {
        let all = ctx
            .fleet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .everything();
        let mut tasks = JoinSet::new();
        for (customer, name, maybe) in all {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let _permit = ctx.permits.acquire().await;
                if ctx.api.delete(customer, &name, maybe).await.is_ok() {
                    ctx.fleet
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set(customer, &name, None);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let left = left_behind(ctx).await;
        if left.is_empty() {
            return Vec::new();
        }
        // Delete what metald still lists in the next round, known or not.
        let mut fleet = ctx.fleet.lock().unwrap_or_else(|p| p.into_inner());
        for (c, name) in left {
            if fleet.customer_of(&name).is_none() {
                fleet.maybe.insert((c, name));
            }
        }
    }
    left_behind(ctx).await.into_iter().map(|(_, n)| n).collect()
}

/// This run's VMs that metald still lists (a customer whose list fails
/// counts its known VMs as left).
async fn left_behind(ctx: &Arc<Ctx>) -> Vec<(usize, String)> {
    let prefix = format!(
        "{}-",
        ctx.fleet.lock().unwrap_or_else(|p| p.into_inner()).prefix()
    );
    let mut left = Vec::new();
    for c in 0..ctx.api.customers() {
        match ctx.api.list(c).await {
            Ok(names) => left.extend(
                names
                    .into_iter()
                    .filter(|n| n.starts_with(&prefix))
                    .map(|n| (c, n)),
            ),
            Err(_) => {
                let fleet = ctx.fleet.lock().unwrap_or_else(|p| p.into_inner());
                left.extend(
                    fleet
                        .everything()
                        .into_iter()
                        .filter(|(cust, _, maybe)| *cust == c && !maybe)
                        .map(|(cust, n, _)| (cust, n)),
                );
            }
        }
    }
    left.sort();
    left
}
