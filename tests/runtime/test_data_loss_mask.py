"""Padding and prompt tokens never reach the loss, checked through `model.loss`.

Reference: each sample run alone, unpadded, through the model's full logits (fp32), with the trained
positions picked by hand from the record (predict the response and its eod from the token before
each), averaged with F.cross_entropy. The dataset's batch, with garbage written into every padded
idx position, must give the same loss through the sliced `model.loss`.
Tolerance: fp32, 1e-5 relative (different reduction order; the model runs the same weights).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rwkvslice.data import build_dataset, collate, get_tokenizer

RECORDS = [
    {"prompt": "key a1 b2 ?b", "response": "2"},
    {"prompt": "x", "response": "hello"},
    {"text": "every token trained"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
]


@pytest.fixture(scope="module")
def model():
    from rwkvslice import RWKV7, RWKV7Config

    torch.manual_seed(0)
    m = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32)).eval()
    with torch.no_grad():  # the official init zeroes some outputs; randomise so every token matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def reference_terms(model, record, tok):
    """(sum of CE, count) over the trained positions of one record, from its own unpadded forward."""
    eod = tok.eod_id
    if "text" in record:
        seq = tok.encode(record["text"]) + [eod]
        trained = list(range(1, len(seq)))
    elif "prompt" in record:
        p, r = tok.encode(record["prompt"]), tok.encode(record["response"]) + [eod]
        seq, trained = p + r, list(range(len(p), len(p) + len(r)))
    else:
        head = tok.encode("User: hi\n\nAssistant:")
        reply = tok.encode(" yo") + [eod]
        seq, trained = head + reply, list(range(len(head), len(head) + len(reply)))
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0].double()  # full logits (T, V)
    rows = torch.tensor([t - 1 for t in trained])  # position t-1 predicts token t
    ce = F.cross_entropy(logits[rows], torch.tensor([seq[t] for t in trained]), reduction="sum")
    return float(ce), len(trained)


@pytest.mark.parametrize("pack", [False, True])
def test_padding_and_prompts_never_reach_the_loss(tmp_path, model, pack):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    tok = get_tokenizer("byte")
    ds = build_dataset(path, tok, 48, pack=pack)
    idx, targets, *packed = collate([ds[i] for i in range(len(ds))])
    assert len(packed) == (1 if pack else 0)  # packed windows carry their resets
    resets = packed[0] if pack else None
    assert (idx == 0).any()  # there is padding to poison

    terms = [reference_terms(model, r, tok) for r in RECORDS]
    expected = sum(s for s, _ in terms) / sum(n for _, n in terms)
    assert int((targets != -100).sum()) == sum(n for _, n in terms) == ds.stats["kept_tokens"]

    # right padding: everything after a window's last real token; garbage there must change nothing
    garbage = idx.clone()
    for b in range(len(ds)):
        _, length = ds.bounds(b)
        garbage[b, length - 1 :] = torch.randint(1, 320, (48 - length + 1,))
    with torch.no_grad():
        clean = float(model.loss(idx, targets, resets=resets))
        poisoned = float(model.loss(garbage, targets, resets=resets))
    assert clean == pytest.approx(expected, rel=1e-5)  # packed too: the resets make packing exact
    assert poisoned == pytest.approx(clean, rel=1e-6)


def test_targets_in_padding_would_change_the_loss(model):
    """Control: the check above can fail - a target written into a padded slot does change the loss."""
    idx = torch.tensor([[5, 6, 7, 0, 0, 0]])
    targets = torch.tensor([[6, 7, -100, -100, -100, -100]])
    leaked = targets.clone()
    leaked[0, 3] = 9
    with torch.no_grad():
        assert float(model.loss(idx, targets)) != pytest.approx(float(model.loss(idx, leaked)), rel=1e-3)
