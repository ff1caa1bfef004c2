-- Calls, their events and transcripts, stream tokens, and WhatsApp call permissions.
-- Portable DDL (TEXT and BIGINT only, no auto-increment) so one migration and one set of queries
-- serve SQLite and Postgres. Times are Unix milliseconds.

CREATE TABLE calls (
    call_sid          TEXT PRIMARY KEY,
    stream_sid        TEXT,
    direction         TEXT NOT NULL DEFAULT '',
    from_number       TEXT NOT NULL DEFAULT '',
    to_number         TEXT NOT NULL DEFAULT '',
    agent             TEXT,
    status            TEXT NOT NULL,
    status_rank       BIGINT NOT NULL,
    status_sequence   BIGINT NOT NULL DEFAULT -1,
    created_at        BIGINT NOT NULL,
    answered_at       BIGINT,
    ended_at          BIGINT,
    duration_secs     BIGINT,
    end_reason        TEXT,
    openai_session_id TEXT,
    input_tokens      BIGINT NOT NULL DEFAULT 0,
    output_tokens     BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX calls_newest_first ON calls (created_at DESC, call_sid DESC);
CREATE INDEX calls_by_callee ON calls (to_number, created_at);

CREATE TABLE call_events (
    id              TEXT PRIMARY KEY,
    call_sid        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    name            TEXT NOT NULL,
    sequence_number BIGINT,
    detail          TEXT,
    at              BIGINT NOT NULL
);
-- Twilio retries status callbacks: one row per (call, SequenceNumber). NULLs never collide.
CREATE UNIQUE INDEX call_events_once ON call_events (call_sid, kind, sequence_number);

CREATE TABLE transcript_lines (
    call_sid   TEXT NOT NULL,
    sequence   BIGINT NOT NULL,
    speaker    TEXT NOT NULL,
    text       TEXT NOT NULL,
    offset_ms  BIGINT NOT NULL,
    truncated  BIGINT NOT NULL,
    PRIMARY KEY (call_sid, sequence)
);

CREATE TABLE stream_tokens (
    token      TEXT PRIMARY KEY,
    call_sid   TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE call_permissions (
    user_number            TEXT PRIMARY KEY,
    state                  TEXT NOT NULL,
    requested_at           BIGINT,
    answered_at            BIGINT,
    expires_at             BIGINT,
    request_message_sid    TEXT,
    reply_message_sid      TEXT,
    consecutive_unanswered BIGINT NOT NULL DEFAULT 0,
    updated_at             BIGINT NOT NULL
);

CREATE TABLE permission_requests (
    message_sid  TEXT PRIMARY KEY,
    user_number  TEXT NOT NULL,
    requested_at BIGINT NOT NULL
);
CREATE INDEX permission_requests_by_user ON permission_requests (user_number, requested_at);

CREATE TABLE permission_replies (
    message_sid TEXT PRIMARY KEY,
    user_number TEXT NOT NULL,
    payload     TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
