"""The store: one chunked zarr store per sweep (:mod:`~mfdsl.store.zarr`: layout,
atomic writes of finished runs, status codes), its lock (:mod:`~mfdsl.store.lock`) and
its inspection and repair (:mod:`~mfdsl.store.verify`).  docs/store.md is the format.
Nothing is imported here, so that taking the lock does not import xarray; the verbs
are :func:`mfdsl.open_store` and :func:`mfdsl.verify`."""
