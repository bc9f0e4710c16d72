-- Long-polls answer as soon as a job changes: every insert or update of a kit_jobs row
-- notifies kiln_job_changed with the job id, delivered when the transaction commits (identical
-- notifications in one transaction are sent once).

CREATE FUNCTION kit_jobs_notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kiln_job_changed', NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER kit_jobs_changed AFTER INSERT OR UPDATE ON kit_jobs
    FOR EACH ROW EXECUTE FUNCTION kit_jobs_notify_changed();
