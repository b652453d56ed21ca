-- Named queries of the job store. Each block starts with a "-- name: <query>" line and
-- runs as one statement; every timestamp comes from the database clock (now()), so
-- leases and backoffs do not depend on the clocks of the worker machines.

-- name: claim_batch
-- $1 worker id, $2 document types in this round's order of preference, $3 free slots,
-- $4 claim id (fencing token of the batch).
-- Each type reads its own oldest ready rows through a partial index on ready rows
-- (idx_extraction_queue_ocr_claim, or idx_extraction_queue_ready when the planner finds
-- it cheaper), stops after $3 locks and skips locked rows (SKIP LOCKED), so concurrent claimers never wait for nor take the same
-- row. The batch then interleaves the types turn by turn (the first index, the first
-- acte, the second index...): neither type starves the other when both wait.
-- plan_cadastraux is refused here even if configured: those rows skip OCR.
WITH candidate AS (
    SELECT ready.id, ready.created_at, wanted.position,
           row_number() OVER (PARTITION BY wanted.position ORDER BY ready.created_at) AS turn
    FROM unnest($2::text[]) WITH ORDINALITY AS wanted(source, position)
    CROSS JOIN LATERAL (
        SELECT q.id, q.created_at
        FROM extraction_queue AS q
        WHERE q.status_id = 3
          AND q.document_source = wanted.source
          AND (q.ocr_not_before IS NULL OR q.ocr_not_before <= now())
        ORDER BY q.created_at
        LIMIT $3
        FOR UPDATE OF q SKIP LOCKED
    ) AS ready
    WHERE wanted.source <> 'plan_cadastraux'
),
chosen AS (
    SELECT id FROM candidate ORDER BY turn, position LIMIT $3
)
UPDATE extraction_queue AS q
SET status_id = 6,
    ocr_worker_id = $1,
    ocr_started_at = now(),
    ocr_completed_at = NULL,
    ocr_attempts = coalesce(q.ocr_attempts, 0) + 1,
    ocr_claim_id = $4,
    updated_at = now()
FROM chosen
WHERE q.id = chosen.id
RETURNING q.id, q.document_source, q.document_number, q.supabase_path,
          q.circonscription_fonciere, q.cadastre, q.acte_type, q.ocr_attempts,
          coalesce(q.ocr_max_attempts, 3) AS ocr_max_attempts, q.created_at;

-- name: release_claim
-- A claim whose answer was lost with the connection may still have committed: hand its
-- rows back (attempt not counted) before claiming again, or they would sit in 6 under
-- a live lease until this process stops.
UPDATE extraction_queue
SET status_id = 3,
    ocr_attempts = greatest(coalesce(ocr_attempts, 0) - 1, 0),
    updated_at = now()
WHERE ocr_claim_id = $1 AND status_id = 6;

-- name: complete
-- Fenced on the claim: nothing is written unless the row is still 6 and ours.
UPDATE extraction_queue
SET status_id = 5,
    file_content = $3,
    boosted_file_content = $4,
    ocr_completed_at = now(),
    ocr_error = NULL,
    ocr_not_before = NULL,
    updated_at = now()
WHERE id = $1 AND status_id = 6 AND ocr_claim_id = $2
RETURNING true;

-- name: fail
-- $1 id, $2 claim id, $3 ocr_error, $4 permanent, $5 backoff in seconds.
-- Returns the status the row went to (3 or 4), or nothing when the claim was lost.
UPDATE extraction_queue
SET status_id = CASE
        WHEN $4 OR coalesce(ocr_attempts, 0) >= coalesce(ocr_max_attempts, 3) THEN 4
        ELSE 3
    END,
    ocr_not_before = CASE
        WHEN $4 OR coalesce(ocr_attempts, 0) >= coalesce(ocr_max_attempts, 3) THEN NULL
        ELSE now() + make_interval(secs => $5)
    END,
    ocr_error = $3,
    ocr_last_error_at = now(),
    updated_at = now()
WHERE id = $1 AND status_id = 6 AND ocr_claim_id = $2
RETURNING status_id;

-- name: hand_back
-- Shutdown: the attempt was not the document's fault, so it is not counted.
UPDATE extraction_queue
SET status_id = 3,
    ocr_attempts = greatest(coalesce(ocr_attempts, 0) - 1, 0),
    ocr_not_before = NULL,
    updated_at = now()
WHERE id = $1 AND status_id = 6 AND ocr_claim_id = $2
RETURNING true;

-- name: claim_outcome
-- When a fenced write changed nothing: did this claim already write it (a retry whose
-- first answer was lost with the connection), or does the row belong to someone else?
SELECT status_id, ocr_error
FROM extraction_queue
WHERE id = $1 AND ocr_claim_id = $2;

-- name: heartbeat
-- $1 worker id, $2 types, $3 host, $4 pid, $5 lease in seconds.
INSERT INTO ocr_worker_leases AS l (worker_id, worker_types, host, pid, lease_s)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (worker_id) DO UPDATE
SET heartbeat_at = now(),
    worker_types = excluded.worker_types,
    lease_s = excluded.lease_s;

-- name: drop_lease
DELETE FROM ocr_worker_leases WHERE worker_id = $1;

-- name: try_sweep_lock
-- Only one recovery sweep at a time across the fleet; the others skip their turn.
SELECT pg_try_advisory_xact_lock($1);

-- name: recover
-- $1 grace in seconds for rows whose owner never wrote a lease row (it may be between
-- its claim and its first heartbeat). A row is lost only when its owner's heartbeat is
-- older than the owner's own lease: a slow job under a live heartbeat is never taken.
-- $2 is for rows claimed by another system (no ocr_claim_id: the original worker, run
-- side by side): they are left to that system's own sweep, and taken only when far older.
WITH lost AS (
    SELECT q.id
    FROM extraction_queue AS q
    LEFT JOIN ocr_worker_leases AS l ON l.worker_id = q.ocr_worker_id
    WHERE q.status_id = 6
      AND CASE
            WHEN l.worker_id IS NULL AND q.ocr_claim_id IS NULL
                THEN coalesce(q.ocr_started_at < now() - make_interval(secs => $2), true)
            WHEN l.worker_id IS NULL
                THEN coalesce(q.ocr_started_at < now() - make_interval(secs => $1), true)
            ELSE l.heartbeat_at < now() - make_interval(secs => l.lease_s)
          END
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE extraction_queue AS q
SET status_id = CASE
        WHEN coalesce(q.ocr_attempts, 0) >= coalesce(q.ocr_max_attempts, 3) THEN 4
        ELSE 3
    END,
    ocr_error = CASE
        WHEN coalesce(q.ocr_attempts, 0) >= coalesce(q.ocr_max_attempts, 3)
            THEN 'worker lost: ' || coalesce(q.ocr_worker_id, '?')
                 || ' stopped renewing its lease during the last attempt'
        ELSE q.ocr_error
    END,
    ocr_last_error_at = CASE
        WHEN coalesce(q.ocr_attempts, 0) >= coalesce(q.ocr_max_attempts, 3) THEN now()
        ELSE q.ocr_last_error_at
    END,
    updated_at = now()
FROM lost
WHERE q.id = lost.id
RETURNING q.id, q.status_id;

-- name: forget_dead_leases
-- Lease rows of processes gone for long are kept a while for the monitor, then dropped.
DELETE FROM ocr_worker_leases
WHERE heartbeat_at < now() - make_interval(secs => greatest(lease_s * 10, $1));

-- name: queue_depth
SELECT status_id, coalesce(document_source, '') AS document_source, count(*) AS rows
FROM extraction_queue
GROUP BY status_id, document_source;
