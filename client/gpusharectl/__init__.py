"""gpusharectl: the command-line client of gpushared."""
