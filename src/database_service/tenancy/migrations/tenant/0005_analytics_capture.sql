-- Queue every change of the tenant's trading_history and trading_signals for ClickHouse
-- (runs with search_path = {{schema}}; the capture function is control migration 0012's).
CREATE TRIGGER analytics_capture_insert AFTER INSERT ON trading_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER analytics_capture_update AFTER UPDATE ON trading_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER analytics_capture_delete AFTER DELETE ON trading_history
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER analytics_capture_insert AFTER INSERT ON trading_signals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER analytics_capture_update AFTER UPDATE ON trading_signals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
CREATE TRIGGER analytics_capture_delete AFTER DELETE ON trading_signals
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture({{tenant}});
