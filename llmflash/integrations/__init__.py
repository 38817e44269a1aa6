"""Adapters to other tools (lm-evaluation-harness). Each imports its tool at module level, so
nothing here is imported by the CLI."""
