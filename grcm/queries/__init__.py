"""Generated training queries (ACE §3.3 and GRDR/Hybrid-Tower pseudo-queries): ``grcm generate-queries``."""
