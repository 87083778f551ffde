"""One module per command; each exposes `run(...)`. The CLI only parses options and calls them."""

COMMANDS = ("prune", "dsnot", "audit", "eval")
