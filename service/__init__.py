"""The HTTP gateway: app factory, routers, schemas, settings, auth, errors, metrics, cache."""
