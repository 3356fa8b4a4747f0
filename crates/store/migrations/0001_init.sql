-- Refinery's schema, version 1.
--
-- Kept to portable SQL so a PostgreSQL migration can mirror it table for table:
-- `INTEGER PRIMARY KEY` becomes `BIGSERIAL PRIMARY KEY`, `REAL` becomes
-- `DOUBLE PRECISION`, `INTEGER` booleans become `BOOLEAN`. Times are milliseconds
-- since the Unix epoch (UTC) in 64-bit integers.

-- One tenant. Every other row hangs off an account.
CREATE TABLE accounts (
    id            TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
);

-- API keys, stored only as the SHA-256 hex of the key; `key_prefix` is a short,
-- non-secret part of the key kept so operators can tell keys apart.
CREATE TABLE api_keys (
    key_hash      TEXT    NOT NULL PRIMARY KEY,
    account_id    TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key_prefix    TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX api_keys_by_account ON api_keys (account_id);

-- A project is named per account: two accounts may each own a project "x".
-- `live_deployment_id` is the one deployment serving traffic (NULL only while the
-- first deployment is being written, inside its transaction).
CREATE TABLE projects (
    id                 INTEGER NOT NULL PRIMARY KEY,
    account_id         TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name               TEXT    NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    live_deployment_id INTEGER NULL REFERENCES deployments (id),
    UNIQUE (account_id, name)
);

-- An immutable, numbered snapshot of a project. `id` is global (unique across all
-- projects); `number` counts 1, 2, 3... within one project.
CREATE TABLE deployments (
    id            INTEGER NOT NULL PRIMARY KEY,
    project_id    INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    number        INTEGER NOT NULL,
    manifest      TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    UNIQUE (project_id, number)
);

-- The blocks of one deployment, in manifest order (`position`).
CREATE TABLE blocks (
    deployment_id   INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    name            TEXT    NOT NULL,
    language        TEXT    NOT NULL,
    source_name     TEXT    NOT NULL,
    code            TEXT    NOT NULL,
    memory_mb       INTEGER NOT NULL,
    timeout_s       INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    keep_alive_s    INTEGER NULL,
    tmp_mb          INTEGER NOT NULL,
    env_json        TEXT    NOT NULL,
    PRIMARY KEY (deployment_id, name),
    UNIQUE (deployment_id, position)
);

-- One invocation. `project` and `deployment` (the number) are kept by value so the
-- record stays readable as it was, whatever happens to the project later.
CREATE TABLE executions (
    id               TEXT    NOT NULL PRIMARY KEY,
    account_id       TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project          TEXT    NOT NULL,
    deployment       INTEGER NOT NULL,
    block            TEXT    NOT NULL,
    instance_id      TEXT    NOT NULL,
    cold             INTEGER NOT NULL,
    started_at_ms    INTEGER NOT NULL,
    duration_ms      REAL    NOT NULL,
    init_ms          REAL    NULL,
    status           TEXT    NOT NULL,
    input            TEXT    NOT NULL,
    input_truncated  INTEGER NOT NULL,
    output           TEXT    NULL,
    output_truncated INTEGER NOT NULL,
    error_json       TEXT    NULL,
    logs             TEXT    NOT NULL,
    logs_truncated   INTEGER NOT NULL
);
CREATE INDEX executions_by_project ON executions (account_id, project, started_at_ms);
