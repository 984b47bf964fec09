-- Samples are spooled in runs: one row per VM and spool write (every
-- sync interval), holding that write's samples of the VM in sequence
-- order. `body` is 64 bytes per sample: eight little-endian 64-bit
-- integers (seq, ts, cpu_ns, memory_bytes, disk_read, disk_write, net_rx,
-- net_tx). A row and an index entry per sample were most of the spool's
-- cost with a thousand VMs sampled every 100 ms. Rows of the `samples`
-- table left by an earlier metald are moved into runs when the spool
-- opens; the table stays, empty.
CREATE TABLE sample_runs (
    vm_id        TEXT    NOT NULL,
    first_seq    BIGINT  NOT NULL,
    last_seq     BIGINT  NOT NULL,
    -- Unix nanoseconds of the run's first sample.
    first_ts     BIGINT  NOT NULL,
    -- How many samples `body` holds.
    samples      BIGINT  NOT NULL,
    parked       BIGINT  NOT NULL DEFAULT 0,
    body         BLOB    NOT NULL,
    PRIMARY KEY (vm_id, first_seq)
);
