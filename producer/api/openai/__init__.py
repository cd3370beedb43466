"""The OpenAI-compatible image routes' parts: ``request`` (OpenAI's fields as a job
request), ``form`` (an edit's multipart form), ``results`` (waiting, the answers, the
streamed image events) and ``errors`` (OpenAI's error shape).
"""
