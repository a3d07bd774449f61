"""Field protocols as reading sources, and the wire schema every tier speaks."""
