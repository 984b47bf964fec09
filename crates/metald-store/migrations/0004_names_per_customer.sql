-- VM names are per customer: two customers may each have a VM called
-- `web-1`. `vm_id` stays the host-wide key (files, sockets, namespaces,
-- cgroups, leases and billing are named by it); `name` is what the
-- customer chose and sees. Rows from before keep their id as their name.
ALTER TABLE vms ADD COLUMN name TEXT NOT NULL DEFAULT '';
UPDATE vms SET name = vm_id WHERE name = '';
CREATE UNIQUE INDEX vms_customer_name ON vms (customer_id, name);
