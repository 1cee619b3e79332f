"""The WebUI glue: the only part of lib_identity that imports ``modules`` (AUTOMATIC1111).

script (the AlwaysOn script's hooks) → runtime (one generation) → units / methods / unet;
ui (accordion), api (HTTP routes), xyz (plot axes), settings, folders (model folders).
"""
