-- The multi-step operation (boot, shutdown, delete) a VM is in the middle
-- of, written before its first side effect and cleared by its last write.
-- A metald that starts and finds one finishes or rolls the operation back.
ALTER TABLE vms ADD COLUMN pending_op TEXT NULL;
