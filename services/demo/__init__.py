"""The embedded demo: a task, a teacher and a student built locally; three training modes compared."""
