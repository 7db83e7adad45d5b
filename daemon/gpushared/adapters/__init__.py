"""Adapters: the only modules that touch amdsmi, cgroupfs, sdnotify, pyroute2 or /sys."""
