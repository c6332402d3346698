"""What the tests share: the daemon harness, the Prometheus helpers, a fake event loop and a manual clock."""
