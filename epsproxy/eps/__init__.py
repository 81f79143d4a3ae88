"""The endpoint server (``twistd eps``)."""
