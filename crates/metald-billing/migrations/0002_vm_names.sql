-- VM names are per customer; `vm_id` here is metald's host-wide key and
-- `vm_name` the customer's name for the VM, which is what the billing
-- service is told (with the customer id). Rows from before keep '' and are
-- sent under their vm_id, which was their name then.
ALTER TABLE meters ADD COLUMN vm_name TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN vm_name TEXT NOT NULL DEFAULT '';
