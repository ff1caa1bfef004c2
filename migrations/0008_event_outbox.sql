-- Events for the business (CALLBRIDGE_EVENTS_URL), written in the same transaction as the change
-- they announce and delivered from here, so none is lost to a crash or a restart. `id` is the
-- webhook-id sent on every attempt and `body` the exact bytes signed and sent each time.
-- status: 'pending' (to be sent at next_attempt_at), 'delivered', 'failed' (gave up), 'stopped'
-- (the business answered 410). A machine sending an event holds it (claimed_by) until
-- claim_until; once that passes, any machine may take it.
CREATE TABLE event_outbox (
    id              TEXT PRIMARY KEY,
    event_type      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    -- When the current run of attempts began: created_at, or the moment of a manual retry. The
    -- give-up deadline counts from here.
    window_start    BIGINT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    claimed_by      TEXT,
    claim_until     BIGINT,
    last_error      TEXT,
    last_status     BIGINT,
    delivered_at    BIGINT
);
-- What the delivery worker looks for on every poll: pending events that are due.
CREATE INDEX event_outbox_due ON event_outbox (next_attempt_at) WHERE status = 'pending';
-- The API's newest-first listing, optionally by status.
CREATE INDEX event_outbox_newest_first ON event_outbox (created_at DESC, id DESC);
CREATE INDEX event_outbox_by_status ON event_outbox (status, created_at DESC, id DESC);
-- A grant past its expiry is announced (call_permission.updated "expired") once: this records
-- when. A new grant clears it.
ALTER TABLE call_permissions ADD COLUMN expiry_announced_at BIGINT;
CREATE INDEX call_permissions_grants_by_expiry ON call_permissions (expires_at)
    WHERE state = 'granted' AND expiry_announced_at IS NULL;
