-- Which machine carries each live call (the one running its bridge), and when each machine last
-- renewed its lease. A call still live on a machine whose lease ran out (it was killed, or its VM
-- died) is recorded as ended with reason 'lost' instead of staying live forever.
CREATE TABLE machines (
    machine_id   TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
ALTER TABLE calls ADD COLUMN machine_id TEXT;
-- The sweep only ever looks at calls that have not ended.
CREATE INDEX calls_live_by_machine ON calls (machine_id) WHERE ended_at IS NULL;
