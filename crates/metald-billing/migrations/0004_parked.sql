-- Rows the billing service refused for good (invalid_argument, not_found,
-- failed_precondition): kept on disk for an operator, reported to the
-- billing service as a gap, and no longer sent, so they hold up nothing.
ALTER TABLE samples ADD COLUMN parked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN parked BIGINT NOT NULL DEFAULT 0;
