-- A permission request can grant only while it is open: its first answer, a revocation, or a
-- newer request to the same user closes it. NULL means open.
ALTER TABLE permission_requests ADD COLUMN closed_at BIGINT;
-- Requests from before this column are closed if an answer or a revocation came after them, or
-- a newer request replaced them. When exactly they closed is not known: their own time stands in.
UPDATE permission_requests SET closed_at = requested_at
WHERE EXISTS (
    SELECT 1 FROM call_permissions p
    WHERE p.user_number = permission_requests.user_number
      AND (p.state = 'revoked' OR p.answered_at >= permission_requests.requested_at)
) OR EXISTS (
    SELECT 1 FROM permission_requests newer
    WHERE newer.user_number = permission_requests.user_number
      AND newer.requested_at > permission_requests.requested_at
);
