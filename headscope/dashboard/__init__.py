"""Streamlit dashboard over runs. Not built yet; all st.cache_* wrappers will live here."""
