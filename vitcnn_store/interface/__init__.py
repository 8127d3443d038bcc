"""The interface: the ``vitcnn`` command, its report, figures, demo and descriptions,
and the registry of analyses.

This subpackage is the only part of ``vitcnn_store`` that imports ``jobs``
(``tests/test_architecture.py`` enforces it): the store, the models, the data
and the kernels below know nothing of the jobs, and the service above reaches
them through :mod:`vitcnn_store.interface.registry`. Importing it imports
nothing: each module loads what it needs.
"""
