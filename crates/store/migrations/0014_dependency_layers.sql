-- Refinery's schema, version 14: dependency layers (issue 14, BRIEF §7c).
--
-- A layer is built at deploy from a block's requirements.txt / package.json and kept at
-- `<data_dir>/layers/<account_id>/<key>` (read-only); `key` is the hex SHA-256 of the
-- language, the runtime's version and the dependency files. Layers are per account: the
-- same files deployed by two accounts are two layers, built twice.
CREATE TABLE dependency_layers (
    account_id    TEXT    NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key           TEXT    NOT NULL,
    language      TEXT    NOT NULL,
    bytes         INTEGER NOT NULL,
    files         INTEGER NOT NULL,
    build_ms      INTEGER NOT NULL,  -- the build's wall-clock time
    memory_mb     INTEGER NOT NULL,  -- its memory limit: memory_mb × build_ms is its usage
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);

-- Which layer each block of a deployment mounts (none: no row). A rollback to a deployment
-- mounts that deployment's layers again.
CREATE TABLE block_layers (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    layer_key     TEXT    NOT NULL,
    PRIMARY KEY (deployment_id, position)
);
