"""Real text in: tokenizers (tokenizer.py), sources (sources.py), `wb data prepare` (prepare.py) writing
memory-mapped token shards with a document index and a manifest (shards.py), and the loader of
data.kind = "tokens" (loader.py, prefetch.py) whose every sample is a pure function of its global sample
index, so a resumed run, under any data-parallel degree, continues the same sample sequence."""
