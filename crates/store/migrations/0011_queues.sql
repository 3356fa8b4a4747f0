-- Refinery's schema, version 11: durable queues (BRIEF §7b `[[queues]]`).
--
-- One row per message, keyed by (account, project, queue name) — not by deployment — so
-- messages outlive redeploys and rollbacks. A message is:
-- - visible: `dead_at_ms IS NULL AND visible_at_ms <= now` (a consumer may claim it);
-- - in flight: `dead_at_ms IS NULL AND visible_at_ms > now`, `claim` = the run holding it
--   (a claim whose time has passed is void: the message is visible again);
-- - dead-lettered: `dead_at_ms IS NOT NULL` (received `max_receive_count` times and failed).
-- A message processed is deleted, in the same transaction as its consumer step's result.
CREATE TABLE queue_messages (
    seq            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    account_id     TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project        TEXT    NOT NULL,
    queue          TEXT    NOT NULL,
    -- JSON text, as sent.
    body           TEXT    NOT NULL,
    enqueued_at_ms INTEGER NOT NULL,
    visible_at_ms  INTEGER NOT NULL,
    receive_count  INTEGER NOT NULL DEFAULT 0,
    claim          TEXT    NULL,
    dead_at_ms     INTEGER NULL
);
CREATE INDEX queue_messages_ready ON queue_messages (account_id, project, queue, visible_at_ms)
    WHERE dead_at_ms IS NULL;
CREATE INDEX queue_messages_dead ON queue_messages (account_id, project, queue, seq)
    WHERE dead_at_ms IS NOT NULL;
CREATE INDEX queue_messages_claim ON queue_messages (claim) WHERE claim IS NOT NULL;
