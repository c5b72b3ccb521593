"""The embedded demo: a synthetic task, a teacher and a student built locally, three jobs compared."""
