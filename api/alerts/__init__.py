"""Alerts: rules over sliding windows of ingested flows, delivered to webhooks.

* :mod:`.rules` — the rule document (YAML/JSON) and its validation (pure);
* :mod:`.engine` — the evaluator: windows per rule and group, pending/firing/resolved (pure, clock passed in);
* :mod:`.payload` — webhook bodies (Flowscope, Alertmanager, Slack) and the HMAC signature (pure);
* :mod:`.delivery` — one HTTP attempt and the retry schedule (exponential backoff with jitter);
* :mod:`.store` — rules, alert state, seen edges, the outbox and the delivery log in SQL;
* :mod:`.service` — the running part in the server: fed by committed batches, a ticker, a delivery worker.

This package imports nothing heavy at import time (``api.db`` imports :mod:`.store` for its tables).
"""
