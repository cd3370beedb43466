"""The vocabulary both sides share: the contract, errors, settings, the model registry,
Redis key names, logs, metrics, loops, the address guard, object storage and images.

This is the only part of ``producer`` the worker imports, with :mod:`producer.jobs`
and :mod:`producer.services.reconciler`. Nothing here imports torch, a web framework,
or another part of ``producer``.
"""
