"""JSON Schemas: request bodies, realtime events and tool definitions (data, not code)."""
