"""The ground every part stands on: settings, database, tables, logs, sealing, redaction."""
