"""The embedded default model: loads offline, pinned tokenizer, exact paged decoding at 1,000 tokens."""

import pytest
import torch

import flashmem
from flashmem.prompts import fillers_for_tokens, passkey_prompt


@pytest.fixture(scope="module")
def default():
    return flashmem.load_default_model()


def test_tokenizer_adds_no_special_tokens(default):
    _, tok = default
    # recorded once; must hold on every supported transformers release
    assert tok("Hello world, the pass key is 12345.").input_ids == [
        19556, 905, 28, 260, 1301, 1646, 314, 216, 33, 34, 35, 36, 37, 30,
    ]  # fmt: skip


def test_default_model_geometry(default):
    model, _ = default
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (30, 9)
    assert model.config.num_key_value_heads == 3 and model.config.head_dim == 64
    assert model.dtype == torch.float32 and not model.training


def test_greedy_matches_dynamic_cache_on_1000_token_prompt(default):
    model, tok = default
    prompt = passkey_prompt(fillers_for_tokens(tok, 1000), depth=0.4, seed=1)
    ids = tok(prompt.text, return_tensors="pt").input_ids
    assert 950 <= ids.shape[1] <= 1050
    ref = model.generate(
        ids,
        max_new_tokens=64,
        min_new_tokens=64,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=tok.eos_token_id,
    )
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    out = fm.generate(ids, 64, eos_token_id=None, collect_logits=True)
    assert torch.equal(out, ref.sequences)
    last_ref = ref.logits[-1][0]
    rel = (fm.step_logits[-1] - last_ref).abs().max() / last_ref.abs().max()
    assert rel < 1e-4
    # with full attention the model retrieves the key
    assert prompt.key in tok.decode(out[0, ids.shape[1] :])


def test_default_indexer_is_quest_and_the_shipped_checkpoint_is_opt_in(default, tmp_path, monkeypatch):
    """indexer="auto" with nothing prepared resolves to Quest on the embedded model (the shipped
    checkpoint costs device share for no gain there: see flashmem.recall.resolve_indexer), while
    indexer="lookahead" still loads the shipped checkpoint and counts its weights."""
    monkeypatch.setenv("FLASHMEM_CACHE_DIR", str(tmp_path / "empty-cache"))
    model, _ = default
    auto = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256))
    learned = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256, indexer="lookahead"))
    assert auto.indexer_name == "quest"
    assert learned.indexer_name.startswith("lookahead:")
