"""The Streamlit dashboard: ``headscope dashboard [RUNS_DIR]``.

``app.py`` is the entry point (navigation and the sidebar's run picker);
``views/`` holds one file per page; ``data.py`` holds every Streamlit cache
wrapper (runs by path and modification time, models by spec and device), so
nothing outside this package imports streamlit. Pages only read runs and draw
``headscope.plots`` figures; the one computation they start is a head's
attention pattern on a prompt of the user's, through the TransformerLens
bridge, on demand and cached.
"""
