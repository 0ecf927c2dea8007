-- Queue every change of the tenant's trading_history and trading_signals for ClickHouse. Named
-- dbsvc_*: the service's own triggers, which tenant exports leave out (the restored tenant gets
-- them from its migrations)
-- (runs with search_path = {{schema}}; the capture function is control migration 0015's).
CREATE TRIGGER dbsvc_analytics_insert AFTER INSERT ON trading_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER dbsvc_analytics_update AFTER UPDATE ON trading_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER dbsvc_analytics_delete AFTER DELETE ON trading_history
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER dbsvc_analytics_insert AFTER INSERT ON trading_signals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER dbsvc_analytics_update AFTER UPDATE ON trading_signals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER dbsvc_analytics_delete AFTER DELETE ON trading_signals
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
