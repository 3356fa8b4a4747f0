-- Refinery's schema, version 5: per-block outbound network (`network = true` in the manifest).
--
-- 0 (the default, and every block deployed before this version): the block's instances have
-- no network at all. 1: outbound network through pasta and the egress filter (SECURITY.md).
ALTER TABLE blocks ADD COLUMN network BOOLEAN NOT NULL DEFAULT FALSE;
