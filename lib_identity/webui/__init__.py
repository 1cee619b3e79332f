"""WebUI-side glue: the only part of lib_identity that imports the WebUI's `modules` and gradio."""
