//! The run: intervals of iterations, each moving the fleet toward the
//! interval's target; a progress bar per interval; stopping early on
//! SIGINT or SIGTERM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connectrpc::ErrorCode;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::client::Api;
use crate::fleet::Fleet;
use crate::plan::{self, Step, Work};

/// What every task shares.
pub struct Ctx {
    pub api: Api,
    pub fleet: Mutex<Fleet>,
    pub permits: Semaphore,
    pub stop: watch::Receiver<bool>,
}

impl Ctx {
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn fleet(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How the run was set up, for the loop.
pub struct Shape {
    pub intervals: u32,
    pub interval: Duration,
    pub iteration: Duration,
    pub max_vms: u32,
    pub heavy: bool,
    pub seed: u64,
}

/// Runs every interval (or until stopped); the targets drawn.
pub async fn run(ctx: Arc<Ctx>, shape: &Shape) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let mut targets = Vec::new();
    for i in 1..=shape.intervals {
        if ctx.stopped() {
            break;
        }
        let target = plan::draw_target(&mut rng, shape.max_vms, shape.heavy);
        targets.push(target);
        let (r, s, c) = plan::mix(target);
        eprintln!(
            "interval {i}/{}: target {target} VMs ({r} running, {s} stopped, {c} created)",
            shape.intervals
        );
        let bar = progress(i, shape);
        let ticker = tokio::spawn(tick(bar.clone(), ctx.clone(), target));
        interval(&ctx, shape, target, &mut rng).await;
        ticker.abort();
        bar.finish_and_clear();
        let (calls, errors) = ctx.api.stats.totals();
        let (r, s, c) = ctx.fleet().counts();
        eprintln!(
            "interval {i}/{} done: {r} running, {s} stopped, {c} created; {calls} calls, {errors} errors",
            shape.intervals
        );
    }
    targets
}

fn progress(i: u32, shape: &Shape) -> ProgressBar {
    let bar = ProgressBar::new(shape.interval.as_secs().max(1));
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len}s {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("interval {i}/{}", shape.intervals));
    bar
}

/// Keeps the bar's position and message current.
async fn tick(bar: ProgressBar, ctx: Arc<Ctx>, target: u32) {
    let start = Instant::now();
    loop {
        bar.set_position(start.elapsed().as_secs());
        let (r, s, c) = ctx.fleet().counts();
        let (calls, errors) = ctx.api.stats.totals();
        bar.set_message(format!(
            "target {target}: {r} running {s} stopped {c} created | {calls} calls {errors} errors"
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The iterations of one interval.
async fn interval(ctx: &Arc<Ctx>, shape: &Shape, target: u32, rng: &mut StdRng) {
    let end = tokio::time::Instant::now() + shape.interval;
    let mut stop = ctx.stop.clone();
    loop {
        let next = tokio::time::Instant::now() + shape.iteration;
        let seen = ctx.fleet().seen();
        let work = plan::plan(&seen, target, shape.heavy, rng);
        iteration(ctx, work).await;
        if ctx.stopped() || tokio::time::Instant::now() >= end {
            return;
        }
        // Pacing between iterations (not synchronisation): wait for the
        // next tick, the interval's end or a stop, whichever comes first.
        tokio::select! {
            _ = tokio::time::sleep_until(next.min(end)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if tokio::time::Instant::now() >= end {
            return;
        }
    }
}

/// Runs one iteration's work concurrently, then lists every customer's VMs.
async fn iteration(ctx: &Arc<Ctx>, work: Vec<Work>) {
    let mut tasks = JoinSet::new();
    for w in work {
        tasks.spawn(execute(ctx.clone(), w));
    }
    while tasks.join_next().await.is_some() {}
    let mut lists = JoinSet::new();
    for c in 0..ctx.api.customers() {
        let ctx = ctx.clone();
        lists.spawn(async move {
            if ctx.stopped() {
                return;
            }
            let _permit = ctx.permits.acquire().await;
            // Errors are counted by the client; the list itself is only load.
            let _ = ctx.api.list(c).await;
        });
    }
    while lists.join_next().await.is_some() {}
}

/// One VM's steps, in order, until one fails or the run stops.
async fn execute(ctx: Arc<Ctx>, work: Work) {
    let (name, customer) = match &work.vm {
        Some(name) => match ctx.fleet().customer_of(name) {
            Some(c) => (name.clone(), c),
            None => return,
        },
        None => ctx.fleet().new_name(),
    };
    for step in work.steps {
        if ctx.stopped() {
            return;
        }
        let result = {
            let _permit = ctx.permits.acquire().await;
            ctx.api.step(customer, &name, step).await
        };
        match result {
            Ok(seen) => ctx.fleet().set(customer, &name, seen),
            Err(e) => {
                failed(&ctx, customer, &name, step, e.code).await;
                return;
            }
        }
    }
}

/// After a failed step: what metald says the VM is now.
async fn failed(ctx: &Ctx, customer: usize, name: &str, step: Step, code: ErrorCode) {
    if step == Step::Create && refused_outright(code) {
        ctx.fleet().refused(customer, name);
        return;
    }
    let _permit = ctx.permits.acquire().await;
    if let Ok(seen) = ctx.api.info(customer, name).await {
        ctx.fleet().set(customer, name, seen);
    }
}

/// Codes with which metald refuses a create before making anything.
fn refused_outright(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::ResourceExhausted
            | ErrorCode::InvalidArgument
            | ErrorCode::Unauthenticated
            | ErrorCode::PermissionDenied
    )
}
