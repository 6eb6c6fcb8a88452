"""How the demo base model rayimg-tiny-shapes was trained and judged (maintainer tooling, not the product)."""
