-- The extractor's tables, as the original system has them. For development, demos
-- and tests: production databases already have them. Idempotent.

CREATE TABLE IF NOT EXISTS extraction_status (
    id   integer PRIMARY KEY,
    name text    NOT NULL
);

INSERT INTO extraction_status (id, name) VALUES
    (1, 'En attente'),
    (2, 'En traitement'),
    (3, 'Complété'),
    (4, 'Erreur'),
    (5, 'Extraction Complété'),
    (6, 'OCR en traitement')
ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS extraction_queue (
    id                         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    document_source            text,
    document_number            text,
    document_number_normalized text,
    circonscription_fonciere   text,
    cadastre                   text,
    designation_secondaire     text,
    acte_type                  text,
    status_id                  integer     NOT NULL DEFAULT 1 REFERENCES extraction_status (id),
    -- scraping bookkeeping, owned by the extractor ("attemtps" is the real, misspelled name)
    worker_id                  text,
    processing_started_at      timestamptz,
    attemtps                   integer     DEFAULT 0,
    max_attempts               integer     DEFAULT 3,
    retry_count                integer     DEFAULT 0,
    error_message              text,
    supabase_path              text,
    -- OCR results and bookkeeping
    file_content               text,
    boosted_file_content       text,
    ocr_worker_id              text,
    ocr_started_at             timestamptz,
    ocr_completed_at           timestamptz,
    ocr_attempts               integer     DEFAULT 0,
    ocr_max_attempts           integer     DEFAULT 3,
    ocr_error                  text,
    ocr_last_error_at          timestamptz,
    created_at                 timestamptz DEFAULT now(),
    updated_at                 timestamptz DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idx_extraction_queue_ready
    ON extraction_queue (created_at) WHERE status_id = 3;
CREATE INDEX IF NOT EXISTS idx_extraction_queue_ocr_processing
    ON extraction_queue (ocr_started_at) WHERE status_id = 6;
