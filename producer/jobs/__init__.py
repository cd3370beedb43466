"""The Redis state of jobs: the store and its Lua scripts, the event log, the job list,
idempotency claims, the broker (Celery), the fleet registry, and intake (the one write
path of a new job). Built on :mod:`producer.core` only.
"""
