"""``make bench``: the load harness (wrk against real uvicorn processes) and its floors."""
