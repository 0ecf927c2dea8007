-- Tokens revoked one by one, the deployment's id, and a tenant status for a delete under way.

-- A revoked token is refused (``Authenticator``, cached like identities) until it expires
-- anyway; keyed by its service and id (``jti``), so naming one's own service with another
-- service's token id revokes nothing of theirs. expires_at NULL: the expiry was not known
-- (revoked by id alone), so the row is kept.
CREATE TABLE {{control}}.revoked_tokens (
    service_name text NOT NULL,
    jti          text NOT NULL CHECK (length(jti) BETWEEN 1 AND 200),
    expires_at   timestamptz,
    revoked_at   timestamptz NOT NULL DEFAULT now(),
    revoked_by   text,
    PRIMARY KEY (service_name, jti)
);
CREATE INDEX revoked_tokens_expires_at ON {{control}}.revoked_tokens (expires_at);
REVOKE ALL ON {{control}}.revoked_tokens FROM PUBLIC;

-- The deployment's id, drawn once with its control plane and shared by every instance on it:
-- the default audience of its tokens (DBSVC_TOKEN_AUDIENCE overrides it), so that deployments
-- sharing a master key and an issuer still refuse each other's tokens. A database copied into
-- another deployment keeps the id: set DBSVC_TOKEN_AUDIENCE (or draw a new id) there.
CREATE TABLE {{control}}.deployment (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {{control}}.deployment DEFAULT VALUES;
REVOKE ALL ON {{control}}.deployment FROM PUBLIC;

-- 'deleting': a delete has begun (logins refused, sessions ended) and either completes in one
-- transaction or is undone; a crash in between leaves this status, and the delete can be
-- repeated from it (``TenantManager.delete``).
ALTER TABLE {{control}}.tenants DROP CONSTRAINT IF EXISTS tenants_status_check;
ALTER TABLE {{control}}.tenants ADD CONSTRAINT tenants_status_check
    CHECK (status IN ('active', 'suspended', 'deleting'));
