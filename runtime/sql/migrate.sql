-- What the OCR runtime adds to an existing extractor database. Additive and
-- idempotent: it never renames or drops anything, and running it twice changes nothing.

-- Fencing token of the current claim: every write of a result or an error applies only
-- while the row is still in OCR (6) under the same claim.
ALTER TABLE extraction_queue ADD COLUMN IF NOT EXISTS ocr_claim_id uuid;
-- Backoff after a failed attempt: the row is not claimed again before this moment.
ALTER TABLE extraction_queue ADD COLUMN IF NOT EXISTS ocr_not_before timestamptz;

-- Process-level leases: a worker renews its heartbeat on the database clock; the rows
-- it holds are recovered only once the heartbeat is older than the lease.
CREATE TABLE IF NOT EXISTS ocr_worker_leases (
    worker_id     text        PRIMARY KEY,
    worker_types  text[]      NOT NULL,
    host          text        NOT NULL DEFAULT '',
    pid           integer     NOT NULL DEFAULT 0,
    lease_s       double precision NOT NULL DEFAULT 60,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- The claim reads ready rows of one document type, oldest first.
CREATE INDEX IF NOT EXISTS idx_extraction_queue_ocr_claim
    ON extraction_queue (document_source, created_at) WHERE status_id = 3;
-- The recovery sweep and the fenced writes look rows in OCR up by their owner.
CREATE INDEX IF NOT EXISTS idx_extraction_queue_ocr_owner
    ON extraction_queue (ocr_worker_id) WHERE status_id = 6;
