"""State kept outside the decision core: the endpoint registry and its store, health watchers,
probe reports."""
