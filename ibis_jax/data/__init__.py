"""Data: image sources, click simulation, RLE, trajectory synthesis and records."""
