"""vprkit: visual place recognition, from dense features to Recall@N.

The stages live in one package each (``backbones``, ``aggregation``, ``maps``, ``rerank``,
``segments``, ``datasets``, ``evaluation``); :mod:`vprkit.pipeline` composes them and is the
surface the CLI and service call.
"""

__version__ = "0.1.0"
