"""`locca bench`: our engine and server measured side by side, in one run, against what a user would run
instead (Hugging Face `generate()`, a plain FastAPI server) and against the machine's measured limit.
The scripts beside it (bench_backends.py, bench_server.py) measure one question each."""
