"""atelier's GPU side: model loading, job execution, encoding, upload.

``app`` is the process (``python -m worker``); ``lifecycle`` and ``run`` drive any kind of
job, ``generation`` and ``training`` are the two kinds, ``diffusion`` the diffusers-facing
parts and ``builtin`` the models that need no hub. Of ``producer`` it imports only
``producer.core``, ``producer.jobs`` and ``producer.services.reconciler``.
"""
