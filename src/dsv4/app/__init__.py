"""The application layer: what each `dsv4` command does, above the library.

`dsv4.cli` parses arguments and calls these modules; nothing below the app layer imports them.

- `info.py`: `dsv4 info` (formats dsv4.flops' accounting);
- `demo.py`: `dsv4 demo --random` (a random model, one forward, a short generation);
- `train_demo.py`: `make demo` / `dsv4 demo` (the main job on its embedded default);
- `terminal.py`: `dsv4 generate` (streamed to the terminal) and `dsv4 chat` (the REPL);
- `serve.py`: `dsv4 serve` (the run, its engine and uvicorn around dsv4.infer.server's app).
"""
