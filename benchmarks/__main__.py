"""``python -m benchmarks``: the import stays inside the guard so spawn-started children stay light."""

if __name__ == "__main__":
    from benchmarks.run import main

    raise SystemExit(main())
