-- A replayed (signed) /voice request must not mint a second token, and so a second session,
-- for the same call: at most one live token per CallSid.
CREATE UNIQUE INDEX stream_tokens_one_per_call ON stream_tokens (call_sid);
