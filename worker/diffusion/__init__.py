"""diffusers-facing parts: loading pipelines, LoRAs, weighted prompts, the safety
checker, previews, encoding and sweep grids. Each works on a loaded pipeline and knows
nothing of Redis or Celery.
"""
