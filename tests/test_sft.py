from critique_rl.train.sft import length_buckets


def test_length_buckets_partition_and_group_similar_lengths():
    lengths = [10, 60, 11, 58, 12, 9, 61, 10]
    buckets = length_buckets(lengths, num_buckets=2)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    short, long = buckets
    assert max(lengths[i] for i in short) < min(lengths[i] for i in long)
