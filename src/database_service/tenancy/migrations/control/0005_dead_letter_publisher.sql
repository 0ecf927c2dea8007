-- Dead letters remember who published them (issue: dead-letter replay must re-check
-- authorization). A replay is an operator's call without the producer's token, so it re-checks
-- the publishing service as it is now: it must still exist, be active and hold the ingest scope
-- for every tenant the letter's records name. NULL: no valid token (the letter was refused for
-- it, or the pipeline ran without tokens); rows from before this migration are NULL too, so they
-- replay only where tokens are not required.
ALTER TABLE {{control}}.dead_letters ADD COLUMN service text;
