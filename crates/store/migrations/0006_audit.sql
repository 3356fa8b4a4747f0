-- Refinery's schema, version 6: the security audit trail (syscalls the seccomp filter refused).
--
-- One row per kernel audit record the server attributed (or failed to attribute) to an
-- instance. `account_id` is NULL when the record's uid belonged to no instance the server
-- knew (an instance already gone, or another server's): only the operator sees those rows.
-- No foreign key: the trail must outlive what it names. Bounded by the store
-- (`store/src/audit.rs`, `MAX_AUDIT_EVENTS_PER_ACCOUNT` newest rows per account).
CREATE TABLE security_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT,
    at_ms INTEGER NOT NULL,
    project TEXT,
    block TEXT,
    instance TEXT,
    uid INTEGER NOT NULL,
    syscall TEXT NOT NULL,
    comm TEXT NOT NULL,
    action TEXT NOT NULL
);
CREATE INDEX security_events_by_account ON security_events (account_id, id);
