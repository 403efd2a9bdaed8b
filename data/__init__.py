"""Dataset preparation: the published GTAlign parquet (data/gtalign) and the synthetic demo task (data/demo)."""
