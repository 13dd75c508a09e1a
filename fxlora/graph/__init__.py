"""Graph helpers split by what they may do: `read` (pure), `prove` (the checks that make a
match a site, or a Rejection with its reason), `edit` (the only helpers that mutate a graph)."""
