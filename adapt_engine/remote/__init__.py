"""Code written next to every pruned model so stock transformers can load it (trust_remote_code=True).

``adapt_pruned_shapes.py`` is copied verbatim into the output directory; it imports only torch, so it
runs without adapt-engine installed. ``adapt_engine.load_pruned`` uses the very same function.
"""
