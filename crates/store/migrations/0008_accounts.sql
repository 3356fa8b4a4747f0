-- Refinery's schema, version 8: accounts can be disabled by the operator.
--
-- `disabled_at_ms` is NULL for an active account, else when it was disabled. A disabled
-- account's keys are refused (403) and none of its code runs; enabling clears it. Rows
-- written before this migration are active.
ALTER TABLE accounts ADD COLUMN disabled_at_ms INTEGER NULL;
