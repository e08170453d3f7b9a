"""Dataset fingerprint: what the planner knows about a task, split into public header metadata and
quantities derived from pixel values or labels (which are private and handled as such)."""
