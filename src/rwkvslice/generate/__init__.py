"""Generation in RNN mode: sampling (temperature, top-k, top-p, greedy) and batch generation."""

from rwkvslice.generate.rnn import cat_states, generate, prefill
from rwkvslice.generate.sampling import check_sampling_args, sample_next, sampling_probs

__all__ = ["cat_states", "check_sampling_args", "generate", "prefill", "sample_next", "sampling_probs"]
