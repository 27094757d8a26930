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
