-- Optional wake-up for idle workers (`db migrate --notify`): a notification on the
-- channel extraction_queue_ready whenever a row becomes ready for OCR. Workers still
-- poll; without this trigger they only find new rows a poll interval later. Idempotent.

CREATE OR REPLACE FUNCTION ocr_notify_ready() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.status_id IS DISTINCT FROM NEW.status_id THEN
        -- Postgres folds identical payloads of one transaction into one notification,
        -- so a bulk insert wakes each listener once per document type.
        PERFORM pg_notify('extraction_queue_ready', coalesce(NEW.document_source, ''));
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS ocr_notify_ready ON extraction_queue;
CREATE TRIGGER ocr_notify_ready
    AFTER INSERT OR UPDATE OF status_id ON extraction_queue
    FOR EACH ROW WHEN (NEW.status_id = 3)
    EXECUTE FUNCTION ocr_notify_ready();
