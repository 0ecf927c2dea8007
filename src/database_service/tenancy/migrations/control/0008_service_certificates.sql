-- Mutual TLS: client certificates as service identities.

-- A name a client certificate carries (its subject in RFC 4514 form, or "DNS:", "URI:",
-- "EMAIL:" and a subject alternative name) bound to one service. Only certificates the TLS
-- layer verified against DBSVC_TLS_CLIENT_CA_FILE are looked up; a name bound to nothing is
-- refused. One name, one service: a certificate cannot speak for two.
CREATE TABLE {{control}}.service_certificates (
    name         text PRIMARY KEY CHECK (length(name) BETWEEN 3 AND 1000),
    service_name text NOT NULL REFERENCES {{control}}.services (service_name) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text
);
CREATE INDEX service_certificates_service ON {{control}}.service_certificates (service_name);
REVOKE ALL ON {{control}}.service_certificates FROM PUBLIC;

-- One certificate refused whatever it names (a leaked key): by the SHA-256 of its DER form.
CREATE TABLE {{control}}.revoked_certificates (
    fingerprint text PRIMARY KEY CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    revoked_by  text
);
REVOKE ALL ON {{control}}.revoked_certificates FROM PUBLIC;
