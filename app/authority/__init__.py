"""Pure decisions the ledger's callers consult: Cedar policy, key scope, workload identity."""
