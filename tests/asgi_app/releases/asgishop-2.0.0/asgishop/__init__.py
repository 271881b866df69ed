"""A small ASGI app for the uvicorn tests (tests/test_uvicorn.py)."""
