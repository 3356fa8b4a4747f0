-- Refinery's schema, version 2: per-account quota overrides.
--
-- One row per account whose quota differs from the operator's defaults (the
-- `refinery serve --quota-*` flags). A NULL column means "the default"; an account with
-- no row has every default.
CREATE TABLE quotas (
    account_id    TEXT    NOT NULL PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    instances     INTEGER NULL,  -- live instances at once (starting + busy + frozen)
    memory_mb     INTEGER NULL,  -- sum of those instances' blocks' memory_mb
    rate          REAL    NULL,  -- invocations per second (token bucket refill)
    burst         INTEGER NULL,  -- invocations in a burst (token bucket size)
    updated_at_ms INTEGER NOT NULL
);
