"""Queries and state transitions, one module per table family; services and workers call these."""
