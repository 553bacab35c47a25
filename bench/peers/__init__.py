"""A replica of the original stack, for side-by-side benchmarks only.

Runs in its own virtualenv (bench/.venv-peer): it imports celery, fastapi and
psycopg, never campaignd. See bench/peers/celery_app.py for what it copies.
"""
