-- One row per VM. Kept portable to PostgreSQL: TEXT/BIGINT columns only,
-- no SQLite-only functions. The single SQLite-specific piece is `seq`:
-- PostgreSQL spells it `seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY`.
--
-- `seq` is the insertion order and the ListVms cursor. AUTOINCREMENT (not a
-- bare INTEGER PRIMARY KEY) guarantees a value is never handed out twice,
-- even after the newest row is deleted, so a cursor a client holds never
-- comes to point past a VM created later.
CREATE TABLE vms (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id        TEXT    NOT NULL UNIQUE,
    customer_id  TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    -- serde_json of metald_core::vm::VmSpec
    spec_json    TEXT    NOT NULL,
    -- serde_json of metald_core::ports::VmmRuntime; NULL while no VMM runs
    runtime_json TEXT    NULL,
    last_error   TEXT    NULL,
    -- Unix seconds
    created_at   BIGINT  NOT NULL,
    modified_at  BIGINT  NOT NULL
);

-- ListVms without a state filter: one customer's rows in seq order.
CREATE INDEX vms_customer_seq ON vms (customer_id, seq);
-- ListVms with a state filter, and its COUNT(*).
CREATE INDEX vms_customer_state_seq ON vms (customer_id, state, seq);
