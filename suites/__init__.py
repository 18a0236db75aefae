"""Suites of checks, the runner that executes them, and the report writers."""
