"""The service layer: ``vitcnn serve`` puts one store behind HTTP.

- ``/zarr/<key>``: the store's keys as they are stored (GET with Range, HEAD,
  ETag, Cache-Control), so plain zarr readers open ``http://host:port/zarr``;
- ``/api/``: runs, layer slices cut on the server, analysis results, and
  analysis jobs (with ``--allow-jobs``), documented by OpenAPI at ``/docs``;
- ``/`` is left to the explorer pages.

Modules: ``config`` (options, bind and token rules; light), ``command`` (the
``vitcnn serve`` subcommand; light), ``app`` (the FastAPI application and its
middleware), ``keys`` (store keys: traversal rules and reads), ``zarr_routes``,
``api_routes``, ``slices`` (server-side selection and encoding), ``results``
(analysis results as JSON, CSV, netCDF) and ``jobs`` (the job queue and its
records). FastAPI and uvicorn load only when a server starts.
"""
