//! The Firecracker metrics reader: lines Firecracker (or whatever holds the
//! VM's metrics FIFO) writes, summed into the VM's device totals.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metald_vmm::firecracker::metrics::Totals;

fuzz_target!(|data: &[u8]| {
    let totals = Totals::default();
    // The reader hands over `\n`-ended lines of at most a bounded length,
    // as bytes; an unreadable one is skipped.
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (before, lines) = (totals.get(), totals.lines());
        totals.add(line);
        let after = totals.get();
        // Totals only grow, by at most one line at a time.
        assert!(after.disk_read_bytes >= before.disk_read_bytes);
        assert!(after.disk_write_bytes >= before.disk_write_bytes);
        assert!(after.net_rx_bytes >= before.net_rx_bytes);
        assert!(after.net_tx_bytes >= before.net_tx_bytes);
        match totals.lines() - lines {
            0 => assert_eq!(after, before, "a skipped line changed the totals"),
            1 => {}
            n => panic!("one line counted {n} times"),
        }
    }
});
