"""WebSocket gateway: picows listener, per-connection sessions, the native fan-out writer."""
