"""Script wrapper of headscope/bench/attention_stats.py (`headscope bench attention-stats`)."""

from headscope.bench.attention_stats import main

if __name__ == "__main__":
    main()
