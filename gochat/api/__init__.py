"""HTTP control-plane API (aiohttp)."""
