"""The embedded demo: a task, a teacher and a student built locally; three modes compared."""
