"""imaging_assets: a Dagster code location that turns folders of medical images into a searchable,
reproducible, governed radiomics feature store.

The domain packages (``dicom``, ``features``, ``store``, ``analysis``, ``demo``) never import Dagster;
``defs`` wires them into assets.
"""

__version__ = "0.1.0"
