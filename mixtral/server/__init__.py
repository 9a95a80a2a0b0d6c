"""The HTTP server: the Mistral chat API (`protocol.py`, `app.py`) and its web chat page."""
