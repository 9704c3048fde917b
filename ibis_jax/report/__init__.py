"""Human-facing pictures and reports of trajectory records (PNG strips, GIFs, HTML)."""
