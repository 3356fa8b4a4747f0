-- Refinery's schema, version 13: blocks of several files, handlers, and project secrets
-- (BRIEF §7c).
--
-- `function`: the handler function in the block's `source_name` file (`handler =
-- "module.function"`). `secret_env_json`: variable → secret name for the block's `env`
-- entries that name a secret (`{ secret = "api-token" }`): names only, never a value.
ALTER TABLE blocks ADD COLUMN function TEXT NOT NULL DEFAULT 'main';
ALTER TABLE blocks ADD COLUMN secret_env_json TEXT NOT NULL DEFAULT '{}';

-- A directory source's files other than the handler's (which stays in `blocks.code`),
-- at their paths relative to the block's directory. Deleted with their deployment.
CREATE TABLE block_files (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    path          TEXT    NOT NULL,
    contents      TEXT    NOT NULL,
    PRIMARY KEY (deployment_id, position, path)
);

-- A project's secrets, keyed by the project's name within its account (so they can be set
-- before the project's first deploy). The value is sealed with ChaCha20-Poly1305 under the
-- key in `<data_dir>/secrets.key` (0600): `nonce` is the 12-byte nonce, `ciphertext` the
-- sealed value with its tag; the account, project and name are the associated data, so a
-- row copied under another name or account does not open.
CREATE TABLE secrets (
    account_id    TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    project       TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    nonce         BLOB    NOT NULL,
    ciphertext    BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, project, name)
);
