"""Old spelling of ``python -m vlm_sweep.cli.generate`` (kept so existing commands keep working)."""
from vlm_sweep.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
