//! What one billing sample costs: reading a VMM's usage from `/proc`
//! through the files a `Reader` keeps open.
//!
//! Run with `cargo bench -p metald-billing`. The process measured is this
//! bench itself with 8 extra idle threads (a QEMU microVM has about as
//! many: main loop, vCPUs, I/O and RCU threads). Results and method are
//! recorded in docs/benchmarks.md.

use std::time::{Duration, Instant};

use metald_billing::usage::Reader;

fn main() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    let pid = std::process::id() as i32;
    let mut reader = Reader::new(pid);
    // Warm up.
    for _ in 0..100 {
        reader.read().unwrap();
    }
    let n = 5_000;
    let mut samples = Vec::with_capacity(n);
    let all = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(reader.read().unwrap());
        samples.push(t.elapsed());
    }
    let total = all.elapsed();
    samples.sort();
    let pct = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "usage::Reader::read, process with {} threads: mean {:?}, p50 {:?}, p99 {:?}, max {:?} over {n} reads",
        9,
        total / n as u32,
        pct(0.50),
        pct(0.99),
        samples[n - 1]
    );
    let per_vm = total / n as u32;
    println!(
        "at 100 ms sampling: {:.3}% of one core per VM, {:.1}% of one core for 1000 VMs",
        per_vm.as_secs_f64() / 0.1 * 100.0,
        per_vm.as_secs_f64() * 1000.0 / 0.1 * 100.0
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
}
