"""The service edge: metrics endpoint, status page, systemd integration."""
