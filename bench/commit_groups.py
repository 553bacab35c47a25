"""The web role's group commits under a load, for bench/webhook_ingest.py.

Read from the server's own /metrics before and after the load: how many
group commits the event writer made (campaignd_webhook_commit_seconds), how
many webhook requests each held on average, and how long one took from
taking its requests to its commit. A commit's time is wall time: the writer
thread waiting to take the GIL back after each SQLite call is in it.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

COMMITS = "campaignd_webhook_commit_seconds"
REQUESTS = "campaignd_webhook_requests_total"
ANSWERED = {"stored", "duplicate"}


def scrape(url: str) -> dict[str, float]:
    """Commits made, their seconds in all, and webhook requests stored or
    answered as duplicates, as the server counts them now."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {"commits": 0.0, "seconds": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == COMMITS + "_count":
                found["commits"] += sample.value
            elif sample.name == COMMITS + "_sum":
                found["seconds"] += sample.value
            elif sample.name == REQUESTS and sample.labels.get("outcome") in ANSWERED:
                found["requests"] += sample.value
    return found


def between(before: dict, after: dict) -> dict[str, float]:
    """The load's commits: how many, requests a commit, ms a commit."""
    commits = after["commits"] - before["commits"]
    if commits <= 0:
        return {"commits": 0, "requests_a_commit": 0.0, "ms_a_commit": 0.0}
    return {
        "commits": int(commits),
        "requests_a_commit": (after["requests"] - before["requests"]) / commits,
        "ms_a_commit": (after["seconds"] - before["seconds"]) / commits * 1e3,
    }
