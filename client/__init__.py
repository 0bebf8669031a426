"""Redwire's Python SDK: a WebSocket client on the Sans-I/O core, publisher and subscriber."""
