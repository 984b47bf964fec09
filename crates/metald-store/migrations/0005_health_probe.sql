-- One row the health check rewrites now and then: a durable write that
-- fails when the database (or the filesystem under it) cannot be written.
CREATE TABLE health_probe (
    id         BIGINT PRIMARY KEY,
    checked_at BIGINT NOT NULL
);
