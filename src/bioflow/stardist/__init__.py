"""StarDist 2D: star-convex polygon targets, polygon geometry and non-maximum suppression."""
