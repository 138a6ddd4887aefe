"""``python -m anomalib_protorefine.benchmark --config configs/benchmark/<name>.yaml``."""

from anomalib_protorefine.benchmark.pipeline import main

if __name__ == "__main__":
    main()
