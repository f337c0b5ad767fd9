"""Script wrapper of headscope/bench/model_load.py (`headscope bench model-load`)."""

from headscope.bench.model_load import main

if __name__ == "__main__":
    main()
