"""One router per resource; :func:`producer.api.app.create_app` includes each."""
