-- Refinery's schema, version 7: the storage each deployment holds, kept past its removal.
--
-- One row per deployment ever made. `removed_at_ms` is set when the deployment is pruned
-- (retention: `refinery serve --keep-deployments`) or its project deleted; the row stays,
-- so bills can count the storage the deployment held up to then, and so a deployment id
-- is never handed out twice (new ids continue after the highest one here: a code dir
-- `<data>/code/<id>` laid out late for a removed deployment can never be mistaken for a
-- new one's).
--
-- `code_bytes`: the blocks' code (what is billed as GB-months). `stored_bytes`: what the
-- account's storage quota counts: the manifest text, the code as stored, and the code
-- again as laid out for instances under `<data>/code`.
CREATE TABLE deployment_storage (
    deployment_id INTEGER NOT NULL PRIMARY KEY,
    account_id    TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project       TEXT    NOT NULL,
    number        INTEGER NOT NULL,
    code_bytes    INTEGER NOT NULL,
    stored_bytes  INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    removed_at_ms INTEGER NULL,
    removed_by    TEXT    NULL CHECK (removed_by IN ('pruned', 'deleted'))
);
CREATE INDEX deployment_storage_by_account ON deployment_storage (account_id, removed_at_ms);

INSERT INTO deployment_storage
    (deployment_id, account_id, project, number, code_bytes, stored_bytes, created_at_ms)
SELECT d.id, p.account_id, p.name, d.number,
       COALESCE((SELECT SUM(length(CAST(b.code AS BLOB))) FROM blocks b WHERE b.deployment_id = d.id), 0),
       length(CAST(d.manifest AS BLOB))
         + 2 * COALESCE((SELECT SUM(length(CAST(b.code AS BLOB))) FROM blocks b WHERE b.deployment_id = d.id), 0),
       d.created_at_ms
FROM deployments d JOIN projects p ON p.id = d.project_id;

-- The account's storage quota override, MiB (NULL = the server's `--quota-storage-mb`).
ALTER TABLE quotas ADD COLUMN storage_mb INTEGER NULL;
