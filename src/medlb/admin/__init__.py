"""The operator surface: admin API, metrics, dashboard and alerts (ring 4)."""
