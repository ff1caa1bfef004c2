-- What POST /calls asked the agent to know about an outbound call, read when its stream starts.
ALTER TABLE calls ADD COLUMN context TEXT;
