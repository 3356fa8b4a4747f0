-- Refinery's schema, version 4: provisioned concurrency per block.
--
-- `min_warm` instances of the block are started when its deployment goes live and kept
-- warm (never reaped, replaced when discarded) until the deployment is retired. Rows
-- written before this migration provision nothing.
ALTER TABLE blocks ADD COLUMN min_warm INTEGER NOT NULL DEFAULT 0 CHECK (min_warm >= 0);
