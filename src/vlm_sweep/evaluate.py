"""Old spelling of ``python -m vlm_sweep.cli.evaluate`` (kept so existing commands keep working)."""
from vlm_sweep.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
