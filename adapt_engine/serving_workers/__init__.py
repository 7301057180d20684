"""Standalone scripts run inside the serving engines' own virtualenvs (see ``adapt_engine.serving``)."""
