"""Task packages built on the kdkit core."""
