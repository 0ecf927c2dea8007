from database_service.observability import RequestWindow


def test_empty_window_reports_zeroes() -> None:
    summary = RequestWindow().summary()
    assert summary.requests == 0 and summary.error_rate_percent == 0.0


def test_window_reports_latency_and_error_rate() -> None:
    window = RequestWindow()
    for _ in range(99):
        window.record(0.002, True)
    window.record(0.5, False)
    summary = window.summary()
    assert summary.requests == 100
    assert summary.error_rate_percent == 1.0
    assert summary.p50_ms == 2.0
    assert summary.p99_ms == 500.0
