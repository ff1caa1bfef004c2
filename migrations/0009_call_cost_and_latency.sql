-- What each call was billed, by kind of token and summed over all its OpenAI sessions; the
-- model they were priced at and the estimate in micro-dollars (NULL for a model without
-- known prices); and how long the caller waited, in milliseconds.
ALTER TABLE calls ADD COLUMN input_text_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN input_audio_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN input_cached_text_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN input_cached_audio_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN output_text_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN output_audio_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN model TEXT;
ALTER TABLE calls ADD COLUMN cost_micro_usd BIGINT;
ALTER TABLE calls ADD COLUMN openai_connect_ms BIGINT;
ALTER TABLE calls ADD COLUMN first_agent_audio_ms BIGINT;
ALTER TABLE calls ADD COLUMN turns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN turn_p50_ms BIGINT;
ALTER TABLE calls ADD COLUMN turn_max_ms BIGINT;
