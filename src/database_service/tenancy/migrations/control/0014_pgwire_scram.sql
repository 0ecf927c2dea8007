-- The PostgreSQL wire port (issue #16) authenticates services by SCRAM-SHA-256, which cannot use
-- the scrypt hash of a service's secret: the SCRAM verifier (RFC 5802/7677, PostgreSQL's
-- rolpassword format) is stored beside it when the secret is created. Services created before
-- this migration have none and are refused by the port until their secret is renewed.
ALTER TABLE {{control}}.services ADD COLUMN scram_verifier text;
