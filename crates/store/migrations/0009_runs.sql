-- Refinery's schema, version 9: service runs and their steps (the pipeline engine's state).
--
-- Everything the engine needs to resume a run after `kill -9` is here, and every change of
-- it is one transaction (a step's result together with the steps it starts, the join
-- bookkeeping and, when it is the last, the run's end), so a transition never fires twice.
--
-- `deployment_id` is kept by value (no foreign key): runs outlive the pruning of their
-- deployment as history; a run still running when its deployment vanished fails.

CREATE TABLE runs (
    id               TEXT    NOT NULL PRIMARY KEY,
    account_id       TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project          TEXT    NOT NULL,
    deployment_id    INTEGER NOT NULL,
    deployment       INTEGER NOT NULL,
    start            TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    -- Set by a cancel request: running steps finish, nothing new starts.
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- The run's failure ({"type","message"} JSON), set by the first step that failed it;
    -- from then on nothing new starts and the run ends when its running steps have.
    error            TEXT    NULL,
    -- Steps created so far (the next step's `seq`).
    steps            INTEGER NOT NULL DEFAULT 0,
    started_at_ms    INTEGER NOT NULL,
    ended_at_ms      INTEGER NULL
);
CREATE INDEX runs_by_project ON runs (account_id, project, started_at_ms);
CREATE INDEX runs_running ON runs (status) WHERE status = 'running';

-- One step: one block run (one attempt) within a run. `frame` places it in the run's
-- fan-outs ('' outside any; '<parent frame>/<fan-out step id>#<item>' inside one).
-- `depth` is the length of the chain that led to it (the step limit bounds it).
CREATE TABLE steps (
    id             TEXT    NOT NULL PRIMARY KEY,
    run_id         TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL,
    name           TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    transition     TEXT    NOT NULL,
    transition_id  INTEGER NULL,
    parents        TEXT    NOT NULL,
    item           INTEGER NULL,
    frame          TEXT    NOT NULL,
    depth          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    -- The input and backpack it runs with (cleared after it ran if the log level says so).
    input          TEXT    NULL,
    backpack_in    TEXT    NULL,
    output         TEXT    NULL,
    backpack       TEXT    NULL,
    error          TEXT    NULL,
    execution_id   TEXT    NULL,
    not_before_ms  INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    started_at_ms  INTEGER NULL,
    duration_ms    REAL    NULL,
    UNIQUE (run_id, seq)
);
CREATE INDEX steps_active ON steps (run_id, status) WHERE status IN ('pending', 'running');

-- Live work per frame: steps not yet finished in it, plus one for each of its fan-outs not
-- yet joined. A frame whose count reaches 0 is settled (an item done; the run done).
CREATE TABLE run_frames (
    run_id TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    frame  TEXT    NOT NULL,
    live   INTEGER NOT NULL,
    PRIMARY KEY (run_id, frame)
);

-- One fan-out: its items' frames are '<group>#<i>'.
CREATE TABLE run_groups (
    run_id        TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    grp           TEXT    NOT NULL,
    parent_frame  TEXT    NOT NULL,
    from_step     TEXT    NOT NULL,
    transition_id INTEGER NOT NULL,
    items         INTEGER NOT NULL,
    settled       INTEGER NOT NULL,
    depth         INTEGER NOT NULL,
    PRIMARY KEY (run_id, grp)
);

-- Outputs waiting at a join: a fan-in's items (`place` = the group, `slot` = the item) and
-- a merge's branches (`place` = the frame, `slot` = the source's position in `from`).
CREATE TABLE run_joins (
    run_id        TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    place         TEXT    NOT NULL,
    transition_id INTEGER NOT NULL,
    slot          INTEGER NOT NULL,
    step_id       TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    output        TEXT    NOT NULL,
    backpack      TEXT    NOT NULL,
    PRIMARY KEY (run_id, step_id, transition_id)
);
CREATE INDEX run_joins_by_place ON run_joins (run_id, place, transition_id, slot, seq);
