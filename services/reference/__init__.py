"""Reference service: teacher forward passes in FULL, HIDDEN or TOPK encodings."""
