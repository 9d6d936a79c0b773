"""The scheduler's HTTP side: a live dashboard, Prometheus metrics, the state
as JSON and a health probe (see :mod:`.server`).

:mod:`.activity` and :mod:`.demand` read the state machine without changing
it and import no HTTP library; :mod:`.server` (aiohttp) is imported only when
the dashboard is started.
"""
