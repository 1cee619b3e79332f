"""The WebUI glue: the only part of lib_identity that imports ``modules`` (AUTOMATIC1111).

script (the AlwaysOn script's hooks) → runtime (one generation) → units / methods / unet;
ui (accordion), api (HTTP routes), api_gate (422 for bad units in txt2img/img2img), xyz (plot
axes), settings, folders (model folders).
"""

TITLE = "Identity"  # the script's title, which is the API key of alwayson_scripts; never change it
