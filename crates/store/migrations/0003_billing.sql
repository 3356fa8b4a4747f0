-- Refinery's schema, version 3: metering, pricing and monthly bills.
--
-- Money and percentages are exact decimals stored as TEXT (e.g. "0.0000166667"), read
-- back with rust_decimal; never REAL. Periods are calendar months in UTC, "YYYY-MM".

-- The operator's price lists, newest last; the highest id is in force. `body` is the
-- price list as JSON; `granularity_ms` is copied out because metering reads it on every
-- execution.
CREATE TABLE price_lists (
    id             INTEGER NOT NULL PRIMARY KEY,
    body           TEXT    NOT NULL,
    granularity_ms INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL
);

-- Per-account commercial terms; NULL = the price list's default (markup, minimum fee)
-- or no cap.
CREATE TABLE account_billing (
    account_id     TEXT    NOT NULL PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    markup_percent TEXT    NULL,
    minimum_fee    TEXT    NULL,
    spending_cap   TEXT    NULL,
    updated_at_ms  INTEGER NOT NULL
);

-- One row per execution, written in the same transaction as the execution row, so an
-- execution is billed exactly once. `period` is the month of `ended_at_ms` (or the
-- first open month after it, if that month was already closed).
CREATE TABLE usage (
    execution_id   TEXT    NOT NULL PRIMARY KEY REFERENCES executions (id) ON DELETE CASCADE,
    account_id     TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    period         TEXT    NOT NULL,
    project        TEXT    NOT NULL,
    block          TEXT    NOT NULL,
    ended_at_ms    INTEGER NOT NULL,
    memory_mb      INTEGER NOT NULL,
    billed_ms      INTEGER NOT NULL,  -- run duration rounded up to the granularity
    init_billed_ms INTEGER NOT NULL,  -- cold-start init rounded up (0 when warm)
    mb_ms          INTEGER NOT NULL,  -- billed_ms × memory_mb
    init_mb_ms     INTEGER NOT NULL,  -- init_billed_ms × memory_mb
    egress_bytes   INTEGER NOT NULL   -- bytes of the response body (output JSON)
);
CREATE INDEX usage_by_period ON usage (account_id, period);

-- Running sums of `usage` per (account, month, project, block), updated in the same
-- transaction: what usage reports, spending caps and closing read.
CREATE TABLE usage_totals (
    account_id     TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    period         TEXT    NOT NULL,
    project        TEXT    NOT NULL,
    block          TEXT    NOT NULL,
    requests       INTEGER NOT NULL,
    billed_ms      INTEGER NOT NULL,
    init_billed_ms INTEGER NOT NULL,
    mb_ms          INTEGER NOT NULL,
    init_mb_ms     INTEGER NOT NULL,
    egress_bytes   INTEGER NOT NULL,
    PRIMARY KEY (account_id, period, project, block)
);

-- Months that have been closed; a closed month takes no more usage.
CREATE TABLE closed_periods (
    period       TEXT    NOT NULL PRIMARY KEY,
    closed_at_ms INTEGER NOT NULL
);

-- One immutable bill per account and closed month. `body` is the full bill as JSON
-- (lines, subtotal, markup, total, the price list and terms used).
CREATE TABLE bills (
    account_id   TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    period       TEXT    NOT NULL REFERENCES closed_periods (period),
    currency     TEXT    NOT NULL,
    total        TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    closed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, period)
);

-- Bills never change once written (PostgreSQL: the same with a plpgsql trigger).
CREATE TRIGGER bills_are_immutable BEFORE UPDATE ON bills
BEGIN
    SELECT RAISE(ABORT, 'bills are immutable once closed');
END;
