"""The multi-task runtime: task tables, the Runtime, and artifact save/load."""
