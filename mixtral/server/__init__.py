"""The HTTP server: the Mistral chat API and its web chat page (`app.py` lists the rooms)."""
