"""Metal kernel sources."""
