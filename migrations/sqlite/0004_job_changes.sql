-- PostgreSQL's migration 0004 adds a trigger that notifies other processes when a job changes.
-- SQLite has no such channel: its writers announce changes in-process after they commit
-- (kiln_jobs::events). This keeps the two schemas' version numbers in step.
SELECT 1;
