-- pgvector for vector collections (issue #13): created by the service's owner, so that tenant
-- roles can use its type, operators and index methods in their own schemas (a tenant cannot
-- create an extension: pgvector is not a trusted extension). In ``public``, whose USAGE every
-- role has; the store names it, quoted, before every type and operator it uses.
--
-- Where PostgreSQL has no pgvector (Debian's PostgreSQL 15 packages, a managed service without
-- it) nothing is created and vector collections report not_configured; an operator who
-- installs it later runs CREATE EXTENSION vector as the owner (the store finds it on restart).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')
       AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        CREATE EXTENSION vector SCHEMA public;
    END IF;
    -- Search settings as the database's defaults, so that a search needs no SET of its own (one
    -- round trip): 200 candidates hold recall@10 above 0.95 (bench/vector.py; pgvector's default
    -- is 40; stores.vector.pgvector.EF_SEARCH must match), and a filtered search keeps scanning the index until enough rows pass (pgvector
    -- 0.8's iterative scans; results are sorted again by the store). Neither is a limit: a
    -- session may change them for itself, to its own loss only.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        EXECUTE format('ALTER DATABASE %I SET hnsw.ef_search = 200', current_database());
        IF string_to_array((SELECT extversion FROM pg_extension WHERE extname = 'vector'), '.')::int[]
           >= ARRAY[0, 8] THEN
            EXECUTE format('ALTER DATABASE %I SET hnsw.iterative_scan = relaxed_order',
                           current_database());
        END IF;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'pgvector is available but this role may not create it: vector collections'
        ' stay unavailable until its owner runs CREATE EXTENSION vector';
END $$;
