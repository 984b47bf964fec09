-- A VM whose row is gone from metald.db: its meter row is kept until its
-- last samples and notices are delivered, then pruned, so the spool does
-- not grow with every VM ever metered.
ALTER TABLE meters ADD COLUMN removed BIGINT NOT NULL DEFAULT 0;
