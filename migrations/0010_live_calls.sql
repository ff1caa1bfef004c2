-- The dashboard asks for the live calls (stream started, not ended) twice a second while someone
-- watches; this index holds only those calls, so the question costs the same however many calls
-- have ever been recorded. The queries ask for the events and lines of the calls in it
-- (`call_sid IN (…)`), so both databases start from these few calls, not from every line.
CREATE INDEX calls_live ON calls (created_at DESC, call_sid DESC) WHERE stream_sid IS NOT NULL AND ended_at IS NULL;
