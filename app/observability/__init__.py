"""What operators see: Prometheus metrics, Sentry, the lifecycle hooks and the overview."""
