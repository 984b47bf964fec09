-- IPAM: one row per address handed to a VM. The primary key makes a
-- double allocation impossible, also between concurrent creates.
CREATE TABLE ip_leases (
    address    TEXT   PRIMARY KEY,
    vm_id      TEXT   NOT NULL,
    leased_at  BIGINT NOT NULL
);
CREATE INDEX ip_leases_vm ON ip_leases (vm_id);
