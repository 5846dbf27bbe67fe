__version__ = "0.1.0"
# Bumped whenever artifacts for the same inputs could change; part of every cache key.
FORMAT_VERSION = 3  # 3: batch fingerprints hash per-row digests (parallel)
