-- Refinery's schema, version 10: the reply of a run started by an HTTP endpoint.
--
-- The output of the first `then` into a response node (JSON), set once, in the same
-- transaction as that step's result: the endpoint's caller is answered from it.
ALTER TABLE runs ADD COLUMN response TEXT NULL;
