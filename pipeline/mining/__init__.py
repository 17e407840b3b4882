"""Hard-negative mining: normal patches a first model calls tumor, kept for the next training."""
