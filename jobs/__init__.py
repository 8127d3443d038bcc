"""Jobs: Ray extraction and dask analyses, mapping kernels and capture over stored chunks."""

__all__: list[str] = []
