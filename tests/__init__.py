"""gpushare tests."""
