"""Use cases: orchestrate the domain and reach the world only through ports."""
