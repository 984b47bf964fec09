-- The CPU time and disk bytes a VM reached before its current VMM process,
-- and those of its last sample: a VM booted again (a fresh VMM whose own
-- counters start at zero) continues its counters as it continues its
-- sequence, so they never go back within a VM's stream.
ALTER TABLE meters ADD COLUMN carried_cpu_ns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN carried_disk_read BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN carried_disk_write BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN total_cpu_ns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN total_disk_read BIGINT NOT NULL DEFAULT 0;
ALTER TABLE meters ADD COLUMN total_disk_write BIGINT NOT NULL DEFAULT 0;
