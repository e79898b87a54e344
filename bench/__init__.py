"""The latency benchmark (`make bench`, `python -m bench`): the real server over loopback."""
