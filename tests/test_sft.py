from critique_rl.train.sft import length_buckets


def test_length_buckets_partition_and_group_similar_lengths():
    lengths = [10, 60, 11, 58, 12, 9, 61, 10]
    buckets = length_buckets(lengths, num_buckets=2)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    short, long = buckets
    assert max(lengths[i] for i in short) < min(lengths[i] for i in long)


def test_refine_added_steps_by_hand():
    from critique_rl.train.sft import refine_added_steps

    assert refine_added_steps(1000, 2000, 600) == 1300  # 1000 x 2600 / 2000
    assert refine_added_steps(10, 3, 1) == 14  # 13.33 rounded up
    assert refine_added_steps(10, 3, 0) == 10


def test_added_refine_steps_run_longer_and_keep_plain_batches(fast_config, tmp_path):
    from critique_rl.train.trainer import CritiqueGRPOTrainer

    kw = dict(max_steps=0, sft_refine_fraction=0.5, critique_on="all_wrong_groups", sft_steps=20)
    shared = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "s"), **kw)).train()
    added = CritiqueGRPOTrainer(args=fast_config(output_dir=str(tmp_path / "a"), sft_refine_steps="added", **kw)).train()
    assert "sft_steps_run" not in shared
    # 300 plain rows, about half of them with a refinement demo: about 1.5 x 20 steps
    assert 27 <= added["sft_steps_run"] <= 33


def test_id_pairs_train_exactly_like_the_text_pairs_they_tokenise_to():
    """(prompt ids, completion ids + EOS) pairs are used as they are: the same losses, step for step, as the
    text pairs whose tokenisation gives those ids; an id pair that differs changes the losses."""
    from critique_rl.models import build_tiny_model, build_tiny_tokenizer
    from critique_rl.train.sft import sft_warmup

    texts = [("12+3=", "15"), ("4+40=", "44"), ("7+8=", "15"), ("20+2=", "22")]
    tok = build_tiny_tokenizer([p + c for p, c in texts], 64)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = [(enc(p), enc(c) + [tok.eos_token_id]) for p, c in texts]
    runs = []
    for pairs in (texts, ids, [(p, c[:-1]) for p, c in ids]):  # the last: id pairs without EOS differ
        model = build_tiny_model(tok, 64, 1, 2, max_positions=64, seed=0)
        runs.append(sft_warmup(model, tok, pairs, steps=4, batch_size=2, lr=1e-3, seed=0))
    assert runs[0] == runs[1]
    assert runs[2] != runs[0]
