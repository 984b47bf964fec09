-- metald's billing spool: what has been measured and not yet acknowledged
-- by the billing service. Rows are deleted only after an acknowledgement.

-- One row per VM ever metered: where its sample stream stands, so
-- sequences keep increasing across restarts and a restarted metald knows
-- which VMs it was metering and when it last sampled them.
CREATE TABLE meters (
    vm_id        TEXT    PRIMARY KEY,
    customer_id  TEXT    NOT NULL,
    pid          BIGINT  NOT NULL,
    start_time   BIGINT  NOT NULL,
    running      BIGINT  NOT NULL,
    last_seq     BIGINT  NOT NULL,
    -- Unix nanoseconds of the last sample, or of the start.
    last_ts      BIGINT  NOT NULL
);

-- Samples not yet acknowledged.
CREATE TABLE samples (
    vm_id        TEXT    NOT NULL,
    seq          BIGINT  NOT NULL,
    ts           BIGINT  NOT NULL,
    cpu_ns       BIGINT  NOT NULL,
    memory_bytes BIGINT  NOT NULL,
    disk_read    BIGINT  NOT NULL,
    disk_write   BIGINT  NOT NULL,
    net_rx       BIGINT  NOT NULL,
    net_tx       BIGINT  NOT NULL,
    PRIMARY KEY (vm_id, seq)
);

-- Notifications (started, stopped, gap) not yet acknowledged, in order.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    vm_id        TEXT    NOT NULL,
    customer_id  TEXT    NOT NULL,
    t1           BIGINT  NOT NULL,
    t2           BIGINT  NOT NULL
);
