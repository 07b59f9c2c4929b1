"""``difflora bench``: measured speed, compile time and model FLOP utilisation, optionally
against PyTorch peers on the same weights (``peers``); each run writes its section of
``docs/benchmarks.md`` (``report``). ``flops`` states the FLOP formula."""
