"""Core of napari-diffcut: walks, graphs, NCut and the hierarchy (numpy/scipy only)."""
