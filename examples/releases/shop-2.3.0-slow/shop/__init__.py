"""shop: a small WSGI web shop used by hotfleet's demo, docs and tests.

The application is ``shop.app:application``; see examples/README.md for how
to run it under ``node-agent`` and for the releases that upgrade it.  Every
response is JSON and names the version of each module that served it.
"""

VERSION = "1"
