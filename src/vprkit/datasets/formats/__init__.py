"""Standard VPR benchmark formats, one module per format or family; each registers an adapter.

Importing this package (done by :mod:`vprkit.datasets.adapters`) adds them to
:data:`~vprkit.datasets.base.DATASET_ADAPTERS`; ``describe_adapters()`` lists them all. Formats import
:mod:`vprkit.datasets.base`, never the loader that imports them.
"""

from . import amstertime, anyloc, baidu, msls, netvlad_mat, robotcar, vg_split  # noqa: F401
