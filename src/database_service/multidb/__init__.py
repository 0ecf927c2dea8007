"""Multi-store operations (``execute_multi_db_operation``): the parts, checked before anything
runs (``parts``), and the transactional outbox that carries writes of stores outside PostgreSQL
past the commit of the PostgreSQL part (``outbox``)."""
