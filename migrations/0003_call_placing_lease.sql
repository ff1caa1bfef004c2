-- While POST /calls is placing a call to a user, no other request may: the daily limit is
-- checked and the call created under this short lease, even across machines.
ALTER TABLE call_permissions ADD COLUMN placing_until BIGINT;
