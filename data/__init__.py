"""Training data: Hugging Face datasets -> tokens -> packed, shuffled, rank-sharded, resumable batches.

    config.py       DataConfig / SourceConfig (the `data=` Hydra group)
    corpus.py       the built-in corpus (Python's reference docs; no download)
    tokenizer.py    load_tokenizer (any fast HF tokenizer, or a BPE trained on the corpus), check_vocab
    sources.py      a source -> a `datasets.Dataset` (local files, save_to_disk folders, Hub names)
    encode.py       documents -> train/eval by a hash of their text -> one token array, EOS after each
    prepare.py      `python -m data.prepare`: parallel, resumable, memory-bounded tokenisation into shards
    shards.py       the prepared format: token shards + index.json; sizes always, hashes once; bounded open files
    token_store.py  one source split's tokens and document offsets, in memory or in shards
    permutation.py  a keyed O(1)-memory permutation (per-epoch shuffles of any size)
    stream.py       packing: a split as endless non-overlapping blocks of seq_len + 1, reshuffled per epoch
    mixture.py      weighted interleaving of several sources' streams (a new phase may reweight them)
    dataset.py      global sample index -> block, over the mixture
    loader.py       build_loader / PackedLoader: per-rank micro-batches, state_dict, prefetching

The package imports nothing from moe/, upcycle/ or train/. This file imports nothing, so that the
tokenising workers of `data.prepare` start light.
"""
