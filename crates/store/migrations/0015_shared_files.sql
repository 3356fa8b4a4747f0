-- Refinery's schema: project shared files and binary files in directory sources (issue 14).
-- Numbered 0015 so that it never collides with another branch's 0014.
--
-- `shared_json`: the names of the project's shared directories the block lists
-- (`shared = ["common"]`), in order, as a JSON array of strings.
ALTER TABLE blocks ADD COLUMN shared_json TEXT NOT NULL DEFAULT '[]';

-- A directory source's files that are not UTF-8 text, byte for byte (text files stay in
-- `block_files`). Deleted with their deployment.
CREATE TABLE block_binary_files (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    position      INTEGER NOT NULL,
    path          TEXT    NOT NULL,
    contents      BLOB    NOT NULL,
    PRIMARY KEY (deployment_id, position, path)
);

-- The `[[shared]]` directories of a deployment, stored once whichever blocks list them:
-- each file's path relative to its directory and its bytes. Deleted with their deployment.
CREATE TABLE shared_files (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    path          TEXT    NOT NULL,
    contents      BLOB    NOT NULL,
    PRIMARY KEY (deployment_id, name, path)
);
