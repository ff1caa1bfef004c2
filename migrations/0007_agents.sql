-- Structured details of a call's events (a tool call's latency and outcome, keypresses), as
-- JSON text, and the variables POST /calls gave an outbound call (a JSON object of strings).
ALTER TABLE call_events ADD COLUMN data TEXT;
ALTER TABLE calls ADD COLUMN variables TEXT;
