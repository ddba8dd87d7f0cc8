"""Semantic segmentation on the kdkit core."""
