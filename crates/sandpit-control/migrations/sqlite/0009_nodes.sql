-- The fleet: nodes that run sandboxes, each with a lease renewed by heartbeat (times are the
-- database's clock, ms). `epoch` grows with each registration of a name, fencing the old one.
CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    address          TEXT NOT NULL,
    runsc_build      TEXT NOT NULL,
    memory_mib       BIGINT NOT NULL,
    slots            BIGINT NOT NULL,
    status           TEXT NOT NULL,
    epoch            BIGINT NOT NULL,
    lease_until      BIGINT NOT NULL,
    registered_at    BIGINT NOT NULL,
    heartbeat_at     BIGINT NOT NULL,
    free_memory_mib  BIGINT NOT NULL,
    free_slots       BIGINT NOT NULL,
    templates        TEXT NOT NULL,
    images           TEXT NOT NULL
);
CREATE INDEX nodes_by_lease ON nodes(status, lease_until);
