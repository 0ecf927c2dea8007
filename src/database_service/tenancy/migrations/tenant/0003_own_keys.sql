-- The tenant's own id space for shared.market_data (runs with search_path = {{schema}}; see
-- control migration 0004): ids continue after the highest this tenant already has, so no
-- existing key changes, and no other tenant's inserts move this sequence.
CREATE SEQUENCE _market_data_id_seq;
SELECT setval('_market_data_id_seq',
              coalesce((SELECT max(id) FROM {{shared}}.market_data WHERE company_id = {{tenant}}), 0) + 1,
              false);
