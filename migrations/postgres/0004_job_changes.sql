-- Long-polls answer as soon as a job changes: an update of a kit_jobs row that changes what the
-- job JSON shows notifies kiln_job_changed with the job id, delivered when the transaction
-- commits (identical notifications in one transaction are sent once). Inserts do not notify
-- (nobody waits on a job that did not exist) and neither do lease renewals: notifying
-- transactions commit one at a time, and enqueue must not pay for that.

CREATE FUNCTION kit_jobs_notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kiln_job_changed', NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER kit_jobs_changed AFTER UPDATE ON kit_jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
       OR OLD.step IS DISTINCT FROM NEW.step
       OR OLD.steps_done IS DISTINCT FROM NEW.steps_done
       OR OLD.steps_total IS DISTINCT FROM NEW.steps_total
       OR OLD.attempts IS DISTINCT FROM NEW.attempts
       OR OLD.error_code IS DISTINCT FROM NEW.error_code
       OR OLD.finished_at_ms IS DISTINCT FROM NEW.finished_at_ms)
    EXECUTE FUNCTION kit_jobs_notify_changed();
