-- Refinery's schema, version 12: timers (BRIEF §7b `[[timers]]`), each slot fired exactly once.
--
-- `timer_slots` is keyed by project and timer name, not deployment: a redeploy or a rollback
-- keeps it. `last_slot_ms` is the latest slot fired (or, for a timer first seen, the latest
-- slot at or before that moment, counted as fired so that a new timer waits for its next
-- slot). A slot S fires in one transaction that moves `last_slot_ms` up to S (only up),
-- records the fire and creates the run: after `kill -9` it fired with its run, or not at all.
CREATE TABLE timer_slots (
    account_id   TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project      TEXT    NOT NULL,
    timer        TEXT    NOT NULL,
    -- The schedule as the manifest wrote it: a changed schedule starts the timer afresh.
    schedule     TEXT    NOT NULL,
    last_slot_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, project, timer)
);

-- The recent fires of each timer (the most recent 100 are kept): which run each slot
-- started, and when. The key makes a second run for one slot impossible.
CREATE TABLE timer_fires (
    account_id  TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project     TEXT    NOT NULL,
    timer       TEXT    NOT NULL,
    slot_ms     INTEGER NOT NULL,
    run_id      TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    fired_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, project, timer, slot_ms)
);
CREATE INDEX timer_fires_by_run ON timer_fires (run_id);
